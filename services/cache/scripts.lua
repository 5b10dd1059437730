-- Lua scripts of services/cache/store.py; the key layout is described there.
-- Each "-- @name" section is one script; the "remove" section is prepended to every script.
-- ARGV[1] is always the key prefix P. Times are Redis's clock in ms.

-- @remove
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

-- @store
-- ARGV: P, id, tenant, model_version, prompt_version, group, ttl_ms, max_entries, meta,
-- query_text, vector. Returns the ids evicted from the tenant's LRU.
local p, id, tenant, group = ARGV[1], ARGV[2], ARGV[3], ARGV[6]
local ttl, max_entries = tonumber(ARGV[7]), tonumber(ARGV[8])
local key, lru = p .. 'e:' .. id, p .. 'lru:' .. tenant
local existed = redis.call('HEXISTS', p .. 'ix', id)
redis.call('DEL', key)
redis.call('HSET', key, 'm', ARGV[9], 'q', ARGV[10], 'g', group, 'v', ARGV[11])
redis.call('PEXPIRE', key, ttl)
redis.call('HSET', p .. 'ix', id, cjson.encode({tenant, ARGV[4], ARGV[5], group}))
redis.call('ZADD', lru, redis.call('INCR', p .. 'clock'), id)
redis.call('SADD', p .. 'mv:' .. ARGV[4], id)
redis.call('SADD', p .. 'pv:' .. ARGV[5], id)
redis.call('ZADD', p .. 'exp', now_ms() + ttl, id)
if existed == 0 then redis.call('INCR', p .. 'count') end
if group ~= '' then
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
-- ARGV: P, tenant, id, refresh ("1"/"0"), ttl_ms. Moves the entry to the LRU's fresh end and,
-- if refresh, restarts its TTL.
local p, tenant, id = ARGV[1], ARGV[2], ARGV[3]
local lru = p .. 'lru:' .. tenant
if redis.call('ZSCORE', lru, id) then
  redis.call('ZADD', lru, 'XX', redis.call('INCR', p .. 'clock'), id)
end
if ARGV[4] == '1' then
  local ttl = tonumber(ARGV[5])
  if redis.call('PEXPIRE', p .. 'e:' .. id, ttl) == 1 then
    redis.call('ZADD', p .. 'exp', 'XX', now_ms() + ttl, id)
  end
end
return 1

-- @remove_ids
-- ARGV: P, tenant_filter ("" = any tenant), id... Returns how many entries were removed.
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
return #removed

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
