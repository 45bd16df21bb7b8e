# Sourced by the *_study.sh scripts: their common protocol and one cut's evaluation records,
# each written once.

# Calibration 32 × 512 tokens of wiki-offline's train part; perplexity on 4 × 2048-token windows.
CALIB="--calib wiki-offline --nsamples 32 --calib-seqlen 512"
PPL="--ppl-seqlen 2048 --ppl-windows 4 --batch-size 4 --tasks none"

# landed FILE: with COMMIT_RECORDS=1 in the environment, commit the record FILE just written, so
# a study longer than a session lands record by record. Two studies (or a person) committing at
# once collide on git's index lock: a failed commit is retried rather than ending the study.
landed() {
    [ "${COMMIT_RECORDS:-0}" = 1 ] || return 0
    local attempt
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        git add -- "$1" && git commit -q -m "records: $1" --only -- "$1" && return 0
        sleep 3
    done
    return 1
}

# share_dense FROM TO: sweep FROM's dense point (its record, and its HumanEval samples where it
# has them) copied into sweep TO unless TO has its own: one dense evaluation serves every sweep of
# a model under the same evaluation options, whatever their cuts are.
share_dense() {
    local from=$1 to=$2 file
    if [ -f "$to/dense.json" ] || [ ! -f "$from/dense.json" ]; then
        return 0
    fi
    mkdir -p "$to"
    for file in "$from/dense.json" "$from/dense.humaneval.jsonl"; do
        if [ -f "$file" ]; then cp "$file" "$to/"; fi
    done
}

# record FILE COMMAND...: run COMMAND (which writes FILE) unless FILE exists.
record() {
    local file=$1
    shift
    [ -f "$file" ] && return 0
    "$@"
    landed "$file"
}

# measure PREFIX MODEL LABEL [eval options...]: the records PREFIX.{wiki,lambada,tasks}.json
# that are missing — perplexity on wiki-offline's held-out part and on lambada-offline
# ($PPL options), accuracy ($TASKS options); extra options go to all three.
measure() {
    local prefix=$1 model=$2 label=$3
    shift 3
    record "$prefix.wiki.json" dimcut eval "$model" --label "$label" --ppl wiki-offline $PPL "$@" -o "$prefix.wiki.json"
    record "$prefix.lambada.json" dimcut eval "$model" --label "$label" --ppl lambada-offline $PPL "$@" -o "$prefix.lambada.json"
    record "$prefix.tasks.json" dimcut eval "$model" --label "$label" $TASKS "$@" -o "$prefix.tasks.json"
}

# measured PREFIX: whether all three records of a cut exist.
measured() {
    [ -f "$1.wiki.json" ] && [ -f "$1.lambada.json" ] && [ -f "$1.tasks.json" ]
}

# land FILE...: `landed` for each FILE that exists and is new or changed (a sweep rerun leaves
# finished records untouched, and committing an unchanged file fails).
land() {
    local file
    for file in "$@"; do
        if [ -f "$file" ] && [ -n "$(git status --porcelain -- "$file")" ]; then
            landed "$file"
        fi
    done
}

# sweep_point RUNS S MODEL [dimcut sweep options...]: `dimcut sweep` of the one point S into
# RUNS (the dense point first, once), then its new records — and HumanEval samples files — landed.
# Rerun, a finished point costs a few seconds: the sweep finds nothing missing.
sweep_point() {
    local runs=$1 s=$2 model=$3
    shift 3
    dimcut sweep $model --sparsities "$s" -o "$runs" "$@"
    land "$runs/dense.json" "$runs/dense.humaneval.jsonl" "$runs/s$s.json" "$runs/s$s.humaneval.jsonl"
}
