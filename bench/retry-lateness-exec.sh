#!/usr/bin/env bash
# Retry lateness through `consume --exec`, as a sidecar user sees it: 40 messages
# published at once, a shell handler that logs its start and exits 75 (retry) on attempt
# 0, concurrency 50, tiers 1s,2s,4s, no jitter, no breaker. Lateness is the gap from
# attempt 0's logged failure to attempt 1's logged start, minus 1 s: it includes starting
# `sh` and `date` for 40 handlers at once on this machine, which `redrive bench
# --scenario lateness` (in process) leaves out.
#
#   bench/retry-lateness-exec.sh                      # the embedded store
#   bench/retry-lateness-exec.sh redis://127.0.0.1:6379   # a broker (dead letters in a
#                                                          # scratch SQLite file)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-40}"
cargo build --release -p redrive -q
B="$PWD/target/release/redrive"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
export REDRIVE_STORE="sqlite://$dir/store.db"
args=()
[ $# -gt 0 ] && args=(--broker "$1")
queue="lateness-$(date +%s%N)"
cat >"$dir/handler.sh" <<SH
#!/bin/sh
echo "\$REDRIVE_ID \$REDRIVE_ATTEMPT start \$(date +%s%N)" >> "$dir/log"
if [ "\$REDRIVE_ATTEMPT" = 0 ]; then
    echo "\$REDRIVE_ID 0 fail \$(date +%s%N)" >> "$dir/log"
    exit 75
fi
SH
chmod +x "$dir/handler.sh"
# Lanes exist before the publish on every backend: a first consume creates them.
"$B" "${args[@]}" consume "$queue" --exec true --until-idle >/dev/null 2>&1
seq "$N" | sed 's/.*/{"n":&}/' | "$B" "${args[@]}" publish "$queue" >/dev/null
"$B" "${args[@]}" consume "$queue" --exec "$dir/handler.sh" --concurrency 50 \
    --tiers 1s,2s,4s --jitter 0 --breaker off --max-messages $((2 * N)) >/dev/null 2>&1
python3 - "$dir/log" <<'PY'
import sys
seen = {}
for line in open(sys.argv[1]):
    mid, attempt, what, ns = line.split()
    seen[(mid, attempt, what)] = int(ns)
late = sorted((seen[(m, "1", "start")] - ns) / 1e6 - 1000
              for (m, a, w), ns in seen.items() if w == "fail" and (m, "1", "start") in seen)
p = lambda q: late[min(len(late) - 1, max(0, -(-len(late) * q // 100) - 1))]
print(f"{len(late)} retries: lateness ms p50 {p(50):.1f} p99 {p(99):.1f} max {late[-1]:.1f}")
PY
