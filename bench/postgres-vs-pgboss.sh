#!/usr/bin/env bash
# redrive's PostgreSQL backend vs pg-boss on the same PostgreSQL, same scenario, one
# invocation: 20,000 jobs, concurrency 50, 10% failing once, 1% always failing (4
# attempts, then the dead-letter queue). Runs each side ROUNDS times, alternating, and
# prints every run, the medians and the ratio. Each side works in a scratch schema it
# drops at the end.
#
# PGBOSS_MODES picks how pg-boss is driven (see bench/pgboss/bench.mjs): `batch` (the
# fastest found, the default), `fetch`, `work` (its own worker API); with several, the
# ratio is to the fastest.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
N="${N:-20000}"
CONCURRENCY="${CONCURRENCY:-50}"
ROUNDS="${ROUNDS:-3}"
PGBOSS_MODES="${PGBOSS_MODES:-batch}"
# redrive's tiers: D, 2D, 4D ms. pg-boss's retry delay is whole seconds, so its retries
# run at once; that favours pg-boss.
DELAY_MS="${DELAY_MS:-10}"
TIERS="${DELAY_MS}ms,$((2 * DELAY_MS))ms,$((4 * DELAY_MS))ms"
export PG_URL N CONCURRENCY

psql "$PG_URL" -qAtc 'SELECT 1' >/dev/null || { echo "no PostgreSQL at $PG_URL" >&2; exit 1; }
cargo build --release -p redrive-bench -q
(cd bench/pgboss && { [ -d node_modules ] || npm install --no-audit --no-fund --silent; })

out="$(mktemp)"
for _ in $(seq "$ROUNDS"); do
    ./target/release/redrive-bench "$PG_URL" -n "$N" -c "$CONCURRENCY" --tiers "$TIERS" --json | tee -a "$out"
    for mode in $PGBOSS_MODES; do
        MODE="$mode" node bench/pgboss/bench.mjs | tee -a "$out"
    done
done
node -e '
const lines = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
const tools = [...new Set(lines.map((l) => l.tool))];
const medians = Object.fromEntries(tools.map((t) => [t, median(lines.filter((l) => l.tool === t).map((l) => l.jobs_per_sec))]));
for (const t of tools) {
  const runs = lines.filter((l) => l.tool === t);
  console.log(`${t.padEnd(18)} median ${medians[t].toFixed(0)} jobs/s (completed ${runs.map((l) => l.completed)}, dead ${runs.map((l) => l.dead)})`);
}
const peers = tools.filter((t) => t !== "redrive");
const best = peers.reduce((a, b) => (medians[a] >= medians[b] ? a : b));
console.log(`ratio redrive / ${best}: ${(medians.redrive / medians[best]).toFixed(2)}x`);
' "$out"
