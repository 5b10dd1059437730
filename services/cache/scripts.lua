-- Lua scripts of services/cache/store.py; the key layout is described there.
-- Each "-- @name" section is one script; the "lib" section is prepended to every script.
-- ARGV[1] is always the key prefix P. Times are Redis's clock in ms.

-- @lib
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drops an entry and all of its bookkeeping. Returns 1 if it was registered, else 0.
local function remove(p, id)
  local info = redis.call('HGET', p .. 'ix', id)
  redis.call('DEL', p .. 'e:' .. id)
  if not info then return 0 end
  local t = cjson.decode(info)
  redis.call('HDEL', p .. 'ix', id)
  redis.call('HDEL', p .. 'gx', id)
  redis.call('ZREM', p .. 'lru:' .. t[1], id)
  redis.call('SREM', p .. 'mv:' .. t[2], id)
  redis.call('SREM', p .. 'pv:' .. t[3], id)
  redis.call('ZREM', p .. 'exp', id)
  redis.call('DECR', p .. 'count')
  return 1
end

local function publish_removed(p, ids)
  if #ids > 0 then redis.call('PUBLISH', p .. 'events', 'd|' .. table.concat(ids, ',')) end
end

-- Moves an entry to its tenant's LRU fresh end; refresh = '1' also restarts its TTL.
local function touch(p, tenant, id, refresh, ttl)
  local lru = p .. 'lru:' .. tenant
  if redis.call('ZSCORE', lru, id) then
    redis.call('ZADD', lru, 'XX', redis.call('INCR', p .. 'clock'), id)
  end
  if refresh == '1' and redis.call('PEXPIRE', p .. 'e:' .. id, ttl) == 1 then
    redis.call('ZADD', p .. 'exp', 'XX', now_ms() + ttl, id)
  end
end

-- @store
-- ARGV: P, id, tenant, model_version, prompt_version, group, ttl_ms, max_entries, meta,
-- query_text, vector, finish ('S' stop / 'L' length), completion_tokens, max_tokens.
-- Returns the ids evicted from the tenant's LRU.
local p, id, tenant, group = ARGV[1], ARGV[2], ARGV[3], ARGV[6]
local ttl, max_entries = tonumber(ARGV[7]), tonumber(ARGV[8])
local key, lru = p .. 'e:' .. id, p .. 'lru:' .. tenant
local existed = redis.call('HEXISTS', p .. 'ix', id)
redis.call('DEL', key)
redis.call('HSET', key, 'm', ARGV[9], 'q', ARGV[10], 'g', group, 'v', ARGV[11],
           'f', ARGV[12], 'c', ARGV[13], 'x', ARGV[14])
redis.call('PEXPIRE', key, ttl)
redis.call('HSET', p .. 'ix', id, cjson.encode({tenant, ARGV[4], ARGV[5], group}))
redis.call('ZADD', lru, redis.call('INCR', p .. 'clock'), id)
redis.call('SADD', p .. 'mv:' .. ARGV[4], id)
redis.call('SADD', p .. 'pv:' .. ARGV[5], id)
redis.call('ZADD', p .. 'exp', now_ms() + ttl, id)
if existed == 0 then redis.call('INCR', p .. 'count') end
if group ~= '' then
  redis.call('HSET', p .. 'gx', id, group)
  redis.call('PUBLISH', p .. 'events', 'a|' .. id .. '|' .. group .. '|' .. ARGV[11])
end
local evicted = {}
local over = redis.call('ZCARD', lru) - max_entries
if over > 0 then
  -- The new entry has the newest clock, so it is never among the victims.
  for _, victim in ipairs(redis.call('ZRANGE', lru, 0, over - 1)) do
    if remove(p, victim) == 1 then table.insert(evicted, victim) end
  end
end
publish_removed(p, evicted)
return evicted

-- @touch
-- ARGV: P, tenant, id, refresh ('1'/'0'), ttl_ms. Marks the entry used (see touch()).
touch(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
return 1

-- @get
-- ARGV: P, tenant, max_tokens, refresh ('1'/'0'), ttl_ms, id... The exact lookup in one round
-- trip: returns {id, meta} of the first entry that exists and fits max_tokens (a STOP answer
-- with completion_tokens <= max_tokens, or a LENGTH one stored at this max_tokens), marking
-- it used; {} if none.
local p, tenant, mt = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 6, #ARGV do
  local id = ARGV[i]
  local e = redis.call('HMGET', p .. 'e:' .. id, 'm', 'f', 'c', 'x')
  if e[1] and ((e[2] == 'S' and tonumber(e[3]) <= mt) or (e[2] == 'L' and tonumber(e[4]) == mt))
  then
    touch(p, tenant, id, ARGV[4], tonumber(ARGV[5]))
    return {id, e[1]}
  end
end
return {}

-- @remove_ids
-- ARGV: P, tenant_filter ("" = any tenant), id... Returns the ids removed.
local p, tenant_filter = ARGV[1], ARGV[2]
local removed = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local ok = true
  if tenant_filter ~= '' then
    local info = redis.call('HGET', p .. 'ix', id)
    ok = info and cjson.decode(info)[1] == tenant_filter
  end
  if ok and remove(p, id) == 1 then table.insert(removed, id) end
end
publish_removed(p, removed)
return removed

-- @sweep
-- ARGV: P, limit. Removes up to `limit` entries whose expiry passed; returns their ids.
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'exp', '-inf', now_ms(), 'LIMIT', 0,
                       tonumber(ARGV[2]))
local removed = {}
for _, id in ipairs(ids) do
  if remove(p, id) == 1 then table.insert(removed, id) end
end
publish_removed(p, removed)
return removed
