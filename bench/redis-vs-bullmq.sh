#!/usr/bin/env bash
# redrive vs BullMQ on the same Redis, same scenario, one invocation:
# 20,000 jobs, concurrency 50, 10% failing once, 1% always failing (4 attempts).
# Runs each tool ROUNDS times, alternating, and prints every run, the medians and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
N="${N:-20000}"
CONCURRENCY="${CONCURRENCY:-50}"
ROUNDS="${ROUNDS:-3}"
# Retry delays: redrive tiers D, 2D, 4D ms; BullMQ exponential backoff with base D ms
# (D, 2D, 4D). Short by default so the run measures throughput, not the sleep of the
# last always-failing job (which both tools pay equally: 7D ms).
DELAY_MS="${DELAY_MS:-10}"
TIERS="${DELAY_MS}ms,$((2 * DELAY_MS))ms,$((4 * DELAY_MS))ms"
export REDIS_URL N CONCURRENCY DELAY_MS

redis-cli -u "$REDIS_URL" ping >/dev/null || { echo "no Redis at $REDIS_URL" >&2; exit 1; }
cargo build --release -p redrive-bench -q
(cd bench/bullmq && { [ -d node_modules ] || npm install --no-audit --no-fund --silent; })

out="$(mktemp)"
for _ in $(seq "$ROUNDS"); do
    ./target/release/redrive-bench "$REDIS_URL" -n "$N" -c "$CONCURRENCY" --tiers "$TIERS" --json | tee -a "$out"
    node bench/bullmq/bench.mjs | tee -a "$out"
done
node -e '
const lines = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
const of = (tool) => lines.filter((l) => l.tool === tool);
const r = of("redrive"), b = of("bullmq");
const mr = median(r.map((l) => l.jobs_per_sec)), mb = median(b.map((l) => l.jobs_per_sec));
console.log(`\nredrive median ${mr.toFixed(0)} jobs/s (completed ${r.map((l) => l.completed)}, dead ${r.map((l) => l.dead)})`);
console.log(`bullmq  median ${mb.toFixed(0)} jobs/s (completed ${b.map((l) => l.completed)}, failed ${b.map((l) => l.dead)})`);
console.log(`ratio redrive / bullmq: ${(mr / mb).toFixed(2)}x`);
' "$out"
