# Sourced by the *_study.sh scripts: their common protocol and one cut's evaluation records,
# each written once.

# Calibration 32 × 512 tokens of wiki-offline's train part; perplexity on 4 × 2048-token windows.
CALIB="--calib wiki-offline --nsamples 32 --calib-seqlen 512"
PPL="--ppl-seqlen 2048 --ppl-windows 4 --batch-size 4 --tasks none"

# landed FILE: with COMMIT_RECORDS=1 in the environment, commit the record FILE just written, so
# a study longer than a session lands record by record.
landed() {
    if [ "${COMMIT_RECORDS:-0}" = 1 ]; then
        git add -- "$1" && git commit -q -m "records: $1" --only -- "$1"
    fi
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
