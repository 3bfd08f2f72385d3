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

/// KEYS: main. ARGV: group, consumer, id. Re-adds the entry at the tail, uncounted.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OWNED}local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if #e > 0 then redis.call('XADD', KEYS[1], '*', unpack(e[1][2])) end
{DONE}"
    ))
});

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
