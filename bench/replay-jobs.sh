#!/usr/bin/env bash
# What a replay job costs against a plain replay: N dead messages (default 20,000) on
# the embedded store, replayed to a consumer running beside it (`consume --worker` with
# the Python helper, concurrency 64), timed from the replay command's start until every
# message is handled. Modes, side by side in one run: plain, `--canary 10`, `--ordered`
# with no keys (each message its own key) and `--ordered` over 100 keys.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-20000}"
cargo build --release -p redrive -q
B="$PWD/target/release/redrive"
dir="$(mktemp -d)"
consumer=""
cleanup() { [ -n "$consumer" ] && kill "$consumer" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
export REDRIVE_STORE="sqlite://$dir/bench.db"
cat >"$dir/worker.py" <<PY
import os, sys
sys.path.insert(0, "$PWD/clients/python/src")
import redrive_worker as rw
def handle(msg):
    if not os.path.exists("$dir/fixed"):
        raise rw.Poison("cannot parse")
rw.run(handle, concurrency=64)
PY
worker="python3 $dir/worker.py"
handled() { "$B" queues --json | python3 -c 'import json,sys; q=json.loads(sys.stdin.readline()); print(q["main"]+q["inflight"]+q["dlq"])'; }
for mode in plain "--canary 10" "--ordered" "--ordered 100 keys"; do
    rm -f "$dir/fixed"
    if [ "$mode" = "--ordered 100 keys" ]; then
        for k in $(seq 100); do
            python3 -c "import sys; [print('{\"task\":%d}' % i) for i in range($N // 100)]" | "$B" publish q --key "k$k" >/dev/null
        done
    else
        python3 -c "import sys; [print('{\"task\":%d}' % i) for i in range($N)]" | "$B" publish q >/dev/null
    fi
    "$B" consume q --worker "$worker" --concurrency 64 --until-idle 2>/dev/null
    touch "$dir/fixed"
    "$B" consume q --worker "$worker" --concurrency 64 2>/dev/null &
    consumer=$!
    sleep 1
    start=$(date +%s.%N)
    case "$mode" in
        plain) "$B" dlq replay --queue q >/dev/null ;;
        "--ordered 100 keys") "$B" dlq replay --queue q --ordered >/dev/null 2>&1 ;;
        *) "$B" dlq replay --queue q $mode >/dev/null 2>&1 ;;
    esac
    while [ "$(handled)" != "0" ]; do sleep 0.05; done
    secs=$(python3 -c "import time; print(round(time.time() - $start, 2))")
    echo "{\"mode\": \"$mode\", \"messages\": $N, \"seconds\": $secs, \"msgs_per_s\": $(python3 -c "print(round($N / $secs))")}"
    kill "$consumer"; wait "$consumer" 2>/dev/null || true; consumer=""
done
