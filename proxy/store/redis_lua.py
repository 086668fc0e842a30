"""The Lua scripts behind ``RedisStore``: every change to an entry, its LRU rank, the byte budget
and the change stream happens in one script, so they never disagree and no reader sees half.

Every script gets the same fixed keys (``KEYS[1..7]``) and the entry key prefix as ``ARGV[1]``,
the stream's approximate cap as ``ARGV[2]``; script-specific values follow. Entry keys of victims
(evicted or expired entries) are built from the prefix inside the script, which a Cluster allows
only for keys in the slot of the declared ones: there every key starts with the hash tag
``{<namespace>}`` (redis_connect.keyspace), so all of them share one slot.
"""

from __future__ import annotations

FIXED_KEYS = ("lru", "exp", "book", "bytes", "seq", "changes", "evn")

_PRELUDE = """
local LRU, EXP, BOOK, BYTES, SEQ, STREAM, EVN = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local PREFIX, MAXLEN = ARGV[1], ARGV[2]

-- one change event; n numbers them without gaps so a reader can tell when it missed some
local function event(op, key, scope, hasvec)
  local n = redis.call('INCR', EVN)
  redis.call('XADD', STREAM, 'MAXLEN', '~', MAXLEN, '*', 'n', n, 'o', op, 'k', key, 's', scope, 'v', hasvec)
end

-- drop one entry and its bookkeeping; returns its stored fields {m, r, v} when asked and present
local function forget(key, publish, want)
  local fields = false
  if want then
    local got = redis.call('HMGET', PREFIX .. key, 'm', 'r', 'v')
    if got[1] then fields = got end
  end
  redis.call('DEL', PREFIX .. key)
  redis.call('ZREM', LRU, key)
  redis.call('ZREM', EXP, key)
  local book = redis.call('HGET', BOOK, key)
  if book then
    redis.call('HDEL', BOOK, key)
    local size, scope = string.match(book, '^(%d+):(.*)$')
    redis.call('DECRBY', BYTES, size)
    if publish then event('d', key, scope, '0') end
  end
  return fields
end

-- forget (and announce) up to limit entries whose expiry is at or before now
local function purge(now, limit)
  local dead = redis.call('ZRANGEBYSCORE', EXP, '-inf', now, 'LIMIT', 0, limit)
  for _, key in ipairs(dead) do forget(key, true, false) end
  return #dead
end
"""

#: ARGV[3..]: key, scope, meta, response, vector, size, now, expires, ttl_ms, max_entries,
#: max_bytes, purge_limit. KEYS[8]: the entry. Returns the replaced entry's fields, then those
#: of every entry evicted to make room, oldest first.
PUT = _PRELUDE + """
local key, scope, size = ARGV[3], ARGV[4], ARGV[8]
purge(ARGV[9], tonumber(ARGV[14]))
local out = {}
-- the put event replaces the old vector in every index, so the replacement is not announced
local old = forget(key, false, true)
if old then table.insert(out, old) end
redis.call('HSET', KEYS[8], 's', scope, 'x', ARGV[10], 'm', ARGV[5], 'r', ARGV[6], 'v', ARGV[7])
redis.call('PEXPIRE', KEYS[8], ARGV[11])
redis.call('ZADD', LRU, redis.call('INCR', SEQ), key)
redis.call('ZADD', EXP, ARGV[10], key)
redis.call('HSET', BOOK, key, size .. ':' .. scope)
redis.call('INCRBY', BYTES, size)
event('p', key, scope, (string.len(ARGV[7]) > 0) and '1' or '0')
local max_entries, max_bytes = tonumber(ARGV[12]), tonumber(ARGV[13])
while redis.call('ZCARD', LRU) > max_entries or tonumber(redis.call('GET', BYTES) or '0') > max_bytes do
  local victim = redis.call('ZRANGE', LRU, 0, 0)[1]
  if (not victim) or victim == key then break end
  local fields = forget(victim, true, true)
  if fields then table.insert(out, fields) end
end
return out
"""

#: ARGV[3]: key. KEYS[8]: the entry. Returns its fields {m, r, v} (nil each when absent) and
#: moves it to the most recently used end.
GET = _PRELUDE + """
local got = redis.call('HMGET', KEYS[8], 'm', 'r', 'v')
if got[1] then redis.call('ZADD', LRU, 'XX', redis.call('INCR', SEQ), ARGV[3]) end
return got
"""

#: ARGV[3]: key. Returns the deleted entry's fields or nil; announces the delete.
DELETE = _PRELUDE + """
return forget(ARGV[3], true, true)
"""

#: ARGV[3]: now, ARGV[4]: purge limit. Returns {entries, bytes} after purging expired entries.
STATS = _PRELUDE + """
purge(ARGV[3], tonumber(ARGV[4]))
return {redis.call('ZCARD', LRU), tonumber(redis.call('GET', BYTES) or '0')}
"""

#: ARGV[3]: "1" to announce the clear (first chunk), ARGV[4]: chunk size. Forgets up to a chunk
#: of entries, least recently used first, without announcing each; returns how many.
CLEAR_CHUNK = _PRELUDE + """
if ARGV[3] == '1' then event('c', '', '', '0') end
local keys = redis.call('ZRANGE', LRU, 0, tonumber(ARGV[4]) - 1)
for _, key in ipairs(keys) do forget(key, false, false) end
return #keys
"""

#: Returns {id of the newest event or "0-0", its number}: the feed position a scan starts from.
POSITION = _PRELUDE + """
local last = redis.call('XREVRANGE', STREAM, '+', '-', 'COUNT', 1)[1]
local n = tonumber(redis.call('GET', EVN) or '0')
if last then return {last[1], n} end
return {'0-0', n}
"""

#: ARGV[3]: token, ARGV[4]: ttl ms. KEYS[8]: the lease. Extends a lease still held by token.
RENEW = _PRELUDE + """
if redis.call('GET', KEYS[8]) == ARGV[3] then return redis.call('PEXPIRE', KEYS[8], ARGV[4]) end
return 0
"""

#: ARGV[3]: token. KEYS[8]: the lease. Deletes a lease still held by token.
RELEASE = _PRELUDE + """
if redis.call('GET', KEYS[8]) == ARGV[3] then return redis.call('DEL', KEYS[8]) end
return 0
"""
