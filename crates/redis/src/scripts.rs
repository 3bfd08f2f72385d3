//! The Lua scripts that make each move atomic. Each settle script first checks that the
//! entry is still pending for the calling consumer (the fencing check).

use std::sync::LazyLock;

use redis::Script;

const OWNED: &str =
    "local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
";

const DONE: &str = "redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
";

/// KEYS: main. ARGV: group, consumer, id.
pub static ACK: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{OWNED}{DONE}")));

/// KEYS: main, tier zset, message hash, tiers set.
/// ARGV: group, consumer, id, due, token, payload, key, has_key, headers, lane, tier.
pub static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNED}redis.call('HSET', KEYS[3], 'payload', ARGV[6], 'h', ARGV[9], 'lane', ARGV[10], 'due', ARGV[4])
if ARGV[8] == '1' then redis.call('HSET', KEYS[3], 'key', ARGV[7]) end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('SADD', KEYS[4], ARGV[11])
{DONE}"
    ))
});

/// KEYS: main, dlq. ARGV: group, consumer, id, payload, key, has_key, headers, dead_at.
pub static DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNED}if ARGV[6] == '1' then
  redis.call('XADD', KEYS[2], '*', 'payload', ARGV[4], 'h', ARGV[7], 'dead_at', ARGV[8], 'key', ARGV[5])
else
  redis.call('XADD', KEYS[2], '*', 'payload', ARGV[4], 'h', ARGV[7], 'dead_at', ARGV[8])
end
{DONE}"
    ))
});

/// KEYS: stream. ARGV: group, consumer, id. Re-adds the entry at the tail, uncounted. An
/// entry without redrive's headers (a plain `XADD`) keeps the id it was first added with
/// in an `origin` field, so the id derived from it stays the same.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNED}local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if #e > 0 then
  local f = e[1][2]
  local has_origin = false
  for i = 1, #f, 2 do if f[i] == 'origin' then has_origin = true end end
  if not has_origin then table.insert(f, 'origin'); table.insert(f, ARGV[3]) end
  redis.call('XADD', KEYS[1], '*', unpack(f))
end
{DONE}"
    ))
});

/// KEYS: stream, isolation stream. ARGV: group, consumer, id, payload, key, has_key,
/// headers, now. Moves the entry to the isolation lane.
pub static ISOLATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNED}if ARGV[6] == '1' then
  redis.call('XADD', KEYS[2], '*', 'payload', ARGV[4], 'h', ARGV[7], 'lane', 'isolated', 'due', ARGV[8], 'key', ARGV[5])
else
  redis.call('XADD', KEYS[2], '*', 'payload', ARGV[4], 'h', ARGV[7], 'lane', 'isolated', 'due', ARGV[8])
end
{DONE}"
    ))
});

/// KEYS: isolation stream. ARGV: group, consumer, lease ms, now.
/// Leases at most one entry: one whose lease ran out (its consumer stopped while running
/// it alone), else a new one. Returns `{claimed, fresh, next_due}`; `next_due` (when the
/// lane has nothing to lease now) is when the oldest lease runs out, or empty.
pub static FETCH_ISOLATED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', 1)[2]
local fresh = {{}}
if #claimed == 0 then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if r then fresh = r[1][2] end
end
local next_due = ''
if #claimed + #fresh == 0 then next_due = {ISOLATED_DUE} end
return {{claimed, fresh, next_due}}
"
    ))
});

/// When the isolation lane's first entry is due: now when one waits unleased, else when
/// the oldest lease runs out, else empty. KEYS: isolation stream. ARGV: group, -, lease
/// ms, now.
const ISOLATED_DUE: &str = "(function()
  local len = redis.call('XLEN', KEYS[1])
  if len == 0 then return '' end
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100)
  if #pending < len then return ARGV[4] end
  local idle = 0
  for _, p in ipairs(pending) do if p[3] > idle then idle = p[3] end end
  return string.format('%d', tonumber(ARGV[4]) + math.max(0, tonumber(ARGV[3]) - idle))
end)()";

/// KEYS: isolation stream. ARGV: group, -, lease ms, now. See [`ISOLATED_DUE`].
pub static ISOLATED_DUE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("return {ISOLATED_DUE}")));

/// KEYS: main. ARGV: group, consumer, id. Resets the entry's idle time.
pub static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNED}redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"
    ))
});

/// One round trip per fetch. KEYS: main, tier zsets…
/// ARGV: group, consumer, now, max, hash key prefix, reclaim idle ms (-1: skip).
/// Promotes due retries, reclaims expired leases, reads new entries, and reports when
/// the next retry is due. Returns `{claimed, fresh, next_due}`.
pub static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local max = tonumber(ARGV[4])
local limit = math.max(max, 100)
for i = 2, #KEYS do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[3], 'LIMIT', 0, limit)
  for _, token in ipairs(due) do
    local h = ARGV[5] .. token
    local fields = redis.call('HGETALL', h)
    if #fields > 0 then redis.call('XADD', KEYS[1], '*', unpack(fields)) end
    redis.call('DEL', h)
    redis.call('ZREM', KEYS[i], token)
  end
end
local claimed = {}
if tonumber(ARGV[6]) >= 0 then
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[6], '0-0', 'COUNT', max)
  claimed = r[2]
end
local fresh = {}
local want = max - #claimed
if want > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', KEYS[1], '>')
  if r then fresh = r[1][2] end
end
local next_due = ''
if #claimed + #fresh < max then
  local best = nil
  for i = 2, #KEYS do
    local f = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    if #f > 0 then
      local s = tonumber(f[2])
      if best == nil or s < best then best = s end
    end
  end
  if best ~= nil then next_due = string.format('%d', best) end
end
return {claimed, fresh, next_due}
",
    )
});
