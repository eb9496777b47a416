"""Every Lua script of the Redis brokers, the key layout they use, and the envelope
they publish (:func:`decode_payload` reads it back).

Every key of a channel carries the channel's hash slot as a hash tag, so that one
script touches one slot (Redis Cluster) and the sharded channel of the same name
lives in that slot too::

    fws:{TAG}:CHANNEL:m      hash: o = last offset, e = epoch (history meta)
    fws:{TAG}:CHANNEL:h      stream of the kept publications, ids OFFSET-0, field d
                             (and f = the sender's JSON, for a client's publication)
    fws:{TAG}:CHANNEL:i:KEY  "OFFSET EPOCH" of an idempotent publish (5 minutes)

``TAG`` is what Redis hashes for the channel name itself: the part between the first
``{`` and the next ``}`` when it is not empty, else the whole name.

What goes over pub/sub for a publication made through fastws is an *envelope*:
``ENVELOPE_PREFIX + b"OFFSET EPOCH UNIXTIME[ ID]\\n" + DATA``.  Anything else on a channel
is a raw publication (a producer's ``PUBLISH``).
"""

from __future__ import annotations

import time

import orjson

__all__ = ["ENVELOPE_PREFIX", "decode_payload", "LOG_PREFIX", "log_keys", "PUBLISH_LUA",
           "HISTORY_LUA", "LOG_SINCE_LUA",
           "hash_tag", "keys_for",
           "PRESENCE_PREFIX", "PRESENCE_JOIN_LUA", "PRESENCE_LEAVE_LUA", "PRESENCE_GET_LUA",
           "PRESENCE_REFRESH_LUA", "presence_keys", "presence_value", "presence_user",
           "REVOKED_PREFIX", "REVOKE_LUA", "LIFECYCLE_STREAM", "LIFECYCLE_NODES",
           "LIFECYCLE_CONNS", "LC_CONNECT_LUA", "LC_DISCONNECT_LUA", "LC_SWEEP_LUA",
           "SCRIPTS", "META_PREFIX", "SENDER_PREFIX", "STREAM_APPEND_LUA"]

ENVELOPE_PREFIX = b"\x00fws\x00"
#: before an envelope (and its LOG_PREFIX part): b"META\n", a publication's meta
META_PREFIX = b"\x00fwm\x00"
#: before a publication's sender in the publish script's arguments (SPEC §13)
SENDER_PREFIX = b"\x00fwf\x00"
_ENV_LEN = len(ENVELOPE_PREFIX)

# KEYS: meta, stream[, idempotency][, log meta, log]
# ARGV: channel, data, history_size, history_ttl_ms, epoch candidate, unix time (and
#       an id, space-separated), idempotency ttl ms, publish command (PUBLISH or
#       SPUBLISH), '' or the feed of the channel's slot (cluster: see broker/cluster.py),
#       this master's replication id and its previous one (master_replid, _replid2),
#       the size of the namespace log (0 or absent: none; then no log keys),
#       then, optionally, META_PREFIX + META + "\n" (found by its prefix among the
#       arguments after the log size): put before what is published (the node's meta
#       of a client's publication, SPEC §13; never kept in history), and
#       SENDER_PREFIX + SENDER (the same way): the JSON {user, client} of the client
#       that made it, kept as field f of its history entry (after d) and of its log
#       entry (SPEC §13); both are looked for after the stream's arguments, if any
#
# The namespace log (docs/history.md) is a second stream, one per namespace, that
# gets every publication of the namespace with its own offset and epoch (entries
# c = channel, o = channel offset, e = channel epoch, d = data[, f = sender]); the
# channel's entry then also keeps n = "LOG_OFFSET LOG_EPOCH", and the envelope starts
# with LOG_PREFIX + b"LOG_OFFSET LOG_EPOCH\n" (for the nodes only: pushes do not carry
# it).  Pattern subscriptions recover from it.  Not on a cluster (the log's slot is
# not the channel's).
#
# The meta hash also keeps `r`, the replication id of the master that wrote it, with
# ":d" appended when the node waited for a replica before acknowledging (durable).
# A master that finds its *previous* replication id there is a replica promoted since
# (a failover), and may lack the old master's last writes:
# * without ":d" even acknowledged ones: the channel starts a new epoch;
# * with ":d" every acknowledged one is here, but some the old master ran and answered
#   503 for (no replica acknowledged them in time) may have been delivered live and be
#   lost now: the offset jumps by 2^20, so none of their offsets is used again and
#   since-recovery still works in the same epoch.
# Offsets are thus never reused in one epoch.  Any other difference of `r` is the same
# master restarted with its data: `r` is updated, the stream goes on.
#
# A namespace with `stream = true` (SPEC §12) passes ARGV[13] = the stream's MAXLEN,
# ARGV[14] user, ARGV[15] client, ARGV[16] unix time in ms, and the stream's key last in
# KEYS.  Its XADD is the script's first write, and an error stops the script there:
# Lua does not roll back, so nothing of a publication whose append failed is kept or
# published.  A retry with the same idempotency key returns before it: appended once.
# The offset and epoch written into the entry are those the rest of the script then
# gives the publication (the same reading of the meta hash, without its writes).
PUBLISH_LUA = r"""
local nk = #KEYS
local nlog = tonumber(ARGV[12] or '0') or 0
local nstream = tonumber(ARGV[13] or '0') or 0
if nlog > 0 then nk = nk - 2 end
if nstream > 0 then nk = nk - 1 end
if nk == 3 then
  local seen = redis.call('GET', KEYS[3])
  if seen then return seen end
end
if nstream > 0 then
  local soff, sepoch = 0, ''
  if tonumber(ARGV[3]) > 0 then
    local m = redis.call('HMGET', KEYS[1], 'o', 'e', 'r')
    local o = tonumber(m[1] or '0') or 0
    if not m[2] or (m[3] ~= ARGV[10] and m[3] == ARGV[11]) then
      soff, sepoch = 1, ARGV[5]
    else
      if m[3] ~= ARGV[10] and m[3] == ARGV[11] .. ':d' then o = o + 1048576 end
      soff, sepoch = o + 1, m[2]
    end
  end
  redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', nstream, '*', 'channel', ARGV[1],
             'data', ARGV[2], 'user', ARGV[14], 'client', ARGV[15], 'offset', soff,
             'epoch', sepoch, 'ts', ARGV[16])
end
local pmeta, sender = '', false
for i = (nstream > 0 and 17 or 13), #ARGV do  -- meta and sender, found by their prefix
  local p = string.sub(ARGV[i], 1, 5)
  if p == '\0fwm\0' then pmeta = ARGV[i] elseif p == '\0fwf\0' then
    sender = string.sub(ARGV[i], 6)
  end
end
local function stream_epoch(mkey, skey, cand)
  local meta = redis.call('HMGET', mkey, 'e', 'r')
  local e = meta[1]
  if e and meta[2] ~= ARGV[10] then
    if meta[2] == ARGV[11] then
      e = false
    else
      if meta[2] == ARGV[11] .. ':d' then
        redis.call('HINCRBY', mkey, 'o', 1048576)
      end
      redis.call('HSET', mkey, 'r', ARGV[10])
    end
  end
  if not e then
    e = cand
    redis.call('DEL', mkey, skey)
    redis.call('HSET', mkey, 'e', e, 'r', ARGV[10])
  end
  return e
end
local size = tonumber(ARGV[3])
local offset, epoch = 0, ''
local env = ''
if size > 0 then
  epoch = stream_epoch(KEYS[1], KEYS[2], ARGV[5])
  offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
  if nlog > 0 then
    local lm, lk = KEYS[nk + 1], KEYS[nk + 2]
    local lepoch = stream_epoch(lm, lk, 'n' .. ARGV[5])  -- never a channel's
    local loff = redis.call('HINCRBY', lm, 'o', 1)
    if sender then
      redis.call('XADD', lk, 'MAXLEN', '~', nlog, loff .. '-0', 'c', ARGV[1], 'o', offset,
                 'e', epoch, 'd', ARGV[2], 'f', sender)
      redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'd', ARGV[2],
                 'f', sender, 'n', loff .. ' ' .. lepoch)
    else
      redis.call('XADD', lk, 'MAXLEN', '~', nlog, loff .. '-0', 'c', ARGV[1], 'o', offset,
                 'e', epoch, 'd', ARGV[2])
      redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'd', ARGV[2],
                 'n', loff .. ' ' .. lepoch)
    end
    redis.call('PEXPIRE', lm, ARGV[4])
    redis.call('PEXPIRE', lk, ARGV[4])
    env = '\0fwn\0' .. loff .. ' ' .. lepoch .. '\n'
  elseif sender then
    redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'd', ARGV[2], 'f', sender)
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'd', ARGV[2])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
env = pmeta .. env .. '\0fws\0' .. offset .. ' ' .. epoch .. ' ' .. ARGV[6] .. '\n' .. ARGV[2]
redis.call(ARGV[8], ARGV[1], env)
if ARGV[9] ~= '' then redis.call('SPUBLISH', ARGV[9], ARGV[1] .. '\n' .. env) end
local res = offset .. ' ' .. epoch
if nk == 3 then redis.call('SET', KEYS[3], res, 'PX', ARGV[7]) end
return res
"""


def decode_payload(payload: bytes, now: float) -> tuple[bytes, int, str, float]:
    """(JSON data, offset, epoch, accepted monotonic time) of one pub/sub payload.

    A fastws envelope carries offset, epoch and the publisher's clock; anything else is
    a raw publication: delivered as is when it is JSON, else as a JSON string.
    """
    if payload.startswith(ENVELOPE_PREFIX):
        nl = payload.find(b"\n", _ENV_LEN)
        offset, epoch, stamp = payload[_ENV_LEN:nl].split(b" ", 3)[:3]
        delay = time.time() - float(stamp)
        return payload[nl + 1:], int(offset), epoch.decode(), now - delay if delay > 0 else now
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        return orjson.dumps(payload.decode("utf-8", "replace")), 0, "", now
    return payload, 0, "", now


# KEYS: meta, stream.  ARGV: limit, since offset ('' = the newest `limit`).
# Returns {top, epoch, first kept offset, entries} ({} when the channel has no meta).
HISTORY_LUA = r"""
local meta = redis.call('HMGET', KEYS[1], 'o', 'e')
if not meta[1] or not meta[2] then return {} end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first_off = ''
if #first > 0 then first_off = first[1][1] end
local limit = tonumber(ARGV[1])
local items = {}
if limit > 0 then
  if ARGV[2] == '' then
    items = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  else
    items = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2] .. '-0', '+', 'COUNT', limit)
  end
end
return {meta[1], meta[2], first_off, items}
"""


# KEYS: log meta, log, channel meta, channel stream.  ARGV: limit, channel offset,
# channel epoch.  Finds where the channel's entry (offset, epoch) sits in the namespace
# log and reads the log after it: {top, epoch, first kept, entries, found} where found
# is the entry's log offset, '' when the entry (or its log epoch) is gone ({} when the
# log has no meta).
LOG_SINCE_LUA = r"""
local meta = redis.call('HMGET', KEYS[1], 'o', 'e')
if not meta[1] or not meta[2] then return {} end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first_off = ''
if #first > 0 then first_off = first[1][1] end
local found = ''
if redis.call('HGET', KEYS[3], 'e') == ARGV[3] then
  local entry = redis.call('XRANGE', KEYS[4], ARGV[2] .. '-0', ARGV[2] .. '-0')
  if #entry > 0 then
    local f = entry[1][2]
    for i = 1, #f, 2 do
      if f[i] == 'n' then
        local sp = string.find(f[i + 1], ' ', 1, true)
        if string.sub(f[i + 1], sp + 1) == meta[2] then
          found = string.sub(f[i + 1], 1, sp - 1)
        end
      end
    end
  end
end
local items = {}
if found ~= '' and tonumber(ARGV[1]) > 0 then
  items = redis.call('XRANGE', KEYS[2], '(' .. found .. '-0', '+', 'COUNT', ARGV[1])
end
return {meta[1], meta[2], first_off, items, found}
"""


def hash_tag(channel: str) -> str:
    """The part of ``channel`` that Redis Cluster hashes (its hash tag, else all of it)."""
    start = channel.find("{")
    if start >= 0:
        end = channel.find("}", start + 1)
        if end > start + 1:
            return channel[start + 1:end]
    return channel


LOG_PREFIX = b"\x00fwn\x00"


def log_keys(namespace: str) -> tuple[str, str]:
    """(meta key, stream key) of ``namespace``'s log (HISTORY_LUA reads it too)."""
    base = f"fws:{{ns:{namespace}}}:~log:"
    return base + "m", base + "h"


def keys_for(channel: str) -> tuple[str, str, str]:
    """(meta key, stream key, idempotency key prefix) of ``channel``."""
    base = f"fws:{{{hash_tag(channel)}}}:{channel}:"
    return base + "m", base + "h", base + "i:"


# ---------------------------------------------------------------------- presence
#
#   fws:{TAG}:CHANNEL:p   hash client id -> "NODE\nUSER_JSON" (the node that holds it)
#   fws:{TAG}:CHANNEL:pz  sorted set client id -> expiry (Redis clock, ms)
#
# Joins and leaves are published on the channel itself as ``PRESENCE_PREFIX +
# b"join|leave NODE CLIENT\n" + USER_JSON`` for the other nodes' local subscribers.
# A node re-adds its own clients every PRESENCE_REFRESH seconds; an entry nobody
# re-added before its expiry belongs to a node that died (or stalled that long).  The
# scripts that touch a channel's presence (refresh and read) first *sweep* it: they
# remove the expired entries and publish a ``leave`` for each, as its node would have
# (same NODE, CLIENT and USER).  The removal and the publish are one script, so an
# expired entry is claimed once: exactly one leave is published, by whichever node
# swept first.  A refresh that finds one of its own entries gone (swept while its node
# stalled) adds it again and publishes a ``join``.

PRESENCE_PREFIX = b"\x00fwp\x00"

# Shared by the presence scripts: removes the expired entries of KEYS[1]/KEYS[2]
# (cutoff: the Redis clock now, ms) and publishes one leave each with command `cmd` on
# `channel`.  An entry without its node (written by an older fastws) leaves as node '-'.
_SWEEP = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function sweep(ms, cmd, channel)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ms)
  for i = 1, #gone do
    local v = redis.call('HGET', KEYS[1], gone[i])
    if v then
      redis.call('HDEL', KEYS[1], gone[i])
      local nl = string.find(v, '\n', 1, true)
      local node, user = '-', v
      if nl then node, user = string.sub(v, 1, nl - 1), string.sub(v, nl + 1) end
      if cmd ~= '' then
        redis.call(cmd, channel, '\0fwp\0leave ' .. node .. ' ' .. gone[i] .. '\n' .. user)
      end
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms) end
end
"""

# KEYS: hash, zset.  ARGV: client, "NODE\nUSER_JSON", ttl ms, publish command, channel,
# event ('' = publish nothing)
PRESENCE_JOIN_LUA = r"""
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if ARGV[6] ~= '' then redis.call(ARGV[4], ARGV[5], ARGV[6]) end
return 1
"""

# KEYS: hash, zset.  ARGV: client, publish command, channel, event
PRESENCE_LEAVE_LUA = r"""
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if n > 0 and ARGV[4] ~= '' then redis.call(ARGV[2], ARGV[3], ARGV[4]) end
return n
"""

# KEYS: hash, zset.  ARGV: ttl ms, publish command, channel, node, then client and
# "NODE\nUSER_JSON" pairs: one node's clients of the channel.  Sweeps, then re-adds
# them (expiry now + ttl); one that was gone is published as a join of NODE.  Returns
# how many it re-added.
PRESENCE_REFRESH_LUA = _SWEEP + r"""
local ms = now_ms()
local ttl = tonumber(ARGV[1])
sweep(ms, ARGV[2], ARGV[3])
for i = 5, #ARGV, 2 do
  local new = redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ms + ttl, ARGV[i])
  if new == 1 then
    local v = ARGV[i + 1]
    local user = string.sub(v, (string.find(v, '\n', 1, true) or 0) + 1)
    redis.call(ARGV[2], ARGV[3], '\0fwp\0join ' .. ARGV[4] .. ' ' .. ARGV[i] .. '\n' .. user)
  end
end
if #ARGV >= 5 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return (#ARGV - 4) / 2
"""

# KEYS: hash, zset.  ARGV: publish command, channel.  Sweeps (publishing the leaves),
# returns HGETALL of the rest.
PRESENCE_GET_LUA = _SWEEP + r"""
sweep(now_ms(), ARGV[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""


def presence_keys(channel: str) -> tuple[str, str]:
    """(hash key, expiry zset key) of ``channel``'s presence."""
    base = f"fws:{{{hash_tag(channel)}}}:{channel}:"
    return base + "p", base + "pz"


def presence_value(node: str, user_json: bytes) -> bytes:
    """What a presence hash keeps for a client: its node and its user (JSON)."""
    return node.encode() + b"\n" + user_json


def presence_user(value: bytes) -> bytes:
    """The user (JSON) of a presence hash value (see :func:`presence_value`)."""
    return value[value.find(b"\n") + 1:]


# ---------------------------------------------------------------------- revocations
#
#   fws:revoked:KIND:KEY  "AT UNTIL" (unix seconds), expiring at UNTIL (KIND: user, jti)

REVOKED_PREFIX = "fws:revoked:"

# KEYS: the revocation's key.  ARGV: at, until, now (unix seconds).  Stores the
# revocation merged with the one already there (the later "at", the later "until");
# returns the value stored.
REVOKE_LUA = r"""
local at, untl = tonumber(ARGV[1]), tonumber(ARGV[2])
local old = redis.call('GET', KEYS[1])
if old then
  local oat, ountl = string.match(old, '^(%S+) (%S+)$')
  if oat and tonumber(oat) and tonumber(oat) > at then at = tonumber(oat) end
  if ountl and tonumber(ountl) and tonumber(ountl) > untl then untl = tonumber(ountl) end
end
local ttl = math.ceil((untl - tonumber(ARGV[3])) * 1000)
if ttl < 1 then ttl = 1 end
local val = string.format('%.6f %.6f', at, untl)
redis.call('SET', KEYS[1], val, 'PX', ttl)
return val
"""

# ---------------------------------------------------------------------- lifecycle
#
#   fastws:lifecycle                    the stream of connect/disconnect records (SPEC §12)
#   fws:{fastws:lifecycle}:c:NODE       hash client id -> JSON [user, ip, transport] of
#                                       NODE's connections whose connect was written
#   fws:{fastws:lifecycle}:n            sorted set NODE -> expiry (Redis clock, ms)
#
# The hash tag puts every key in the stream's slot.  A connection's entry is the claim
# on its one disconnect record: whoever removes the entry writes the record, in the
# same script (the disconnect of the node itself, or the sweep of a surviving node
# once NODE's expiry passed without a refresh: "node lost", as presence sweeps).
# Each script's XADD comes before its other writes of that connection: an append that
# fails leaves the entry (and the claim) in place for a retry.

LIFECYCLE_STREAM = "fastws:lifecycle"
LIFECYCLE_NODES = "fws:{fastws:lifecycle}:n"
LIFECYCLE_CONNS = "fws:{fastws:lifecycle}:c:"

# KEYS: stream, node hash, nodes zset.  ARGV: maxlen, client, "[user, ip, transport]"
# JSON, node, ttl ms, ts ms, user, ip, transport.
LC_CONNECT_LUA = r"""
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', 'connect',
           'client', ARGV[2], 'user', ARGV[7], 'ip', ARGV[8], 'transport', ARGV[9],
           'node', ARGV[4], 'ts', ARGV[6])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[3], ms + tonumber(ARGV[5]), ARGV[4])
return 1
"""

# KEYS: stream, node hash.  ARGV: maxlen, client, node, ts ms, code, reason.
# Returns 1 when this wrote the disconnect, 0 when the entry was gone (claimed).
LC_DISCONNECT_LUA = r"""
local v = redis.call('HGET', KEYS[2], ARGV[2])
if not v then return 0 end
local r = cjson.decode(v)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', 'disconnect',
           'client', ARGV[2], 'user', r[1], 'ip', r[2], 'transport', r[3], 'node', ARGV[3],
           'ts', ARGV[4], 'code', ARGV[5], 'reason', ARGV[6])
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
"""

# KEYS: stream, nodes zset.  ARGV: maxlen, conns prefix, this node, ttl ms.
# Refreshes this node's expiry, then closes out every node whose expiry passed: a
# "node lost" disconnect (code 1006) per connection it held, then its hash is
# deleted.  Returns how many records it wrote.
LC_SWEEP_LUA = r"""
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ms)
local n = 0
for i = 1, #dead do
  if dead[i] ~= ARGV[3] then
    local h = ARGV[2] .. dead[i]
    local all = redis.call('HGETALL', h)
    for j = 1, #all, 2 do
      local r = cjson.decode(all[j + 1])
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', 'disconnect',
                 'client', all[j], 'user', r[1], 'ip', r[2], 'transport', r[3],
                 'node', dead[i], 'ts', ms, 'code', '1006', 'reason', 'node lost')
      n = n + 1
    end
    redis.call('DEL', h)
    redis.call('ZREM', KEYS[2], dead[i])
  end
end
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[4]), ARGV[3])
return n
"""

# ---------------------------------------------------------------------- loading

# The append of a `stream = true` namespace on Redis Cluster (SPEC §12), where the
# stream's slot is not the channel's: step one of a publication there, run on the
# stream's master before the publish script (without its ARGV[13-16]) runs on the
# channel's (broker/cluster.py).  KEYS: the stream[, the idempotency key, in the
# stream's slot].  ARGV: MAXLEN, channel, data, user, client, unix time in ms,
# idempotency ttl ms.  With a key already there (an earlier try appended it), nothing
# is appended again; returns the entry's id (or the earlier one's).  `offset` and
# `epoch` are written as 0 and '': the channel's master gives them after this.
STREAM_APPEND_LUA = r"""
if #KEYS > 1 then
  local seen = redis.call('GET', KEYS[2])
  if seen then return seen end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'channel', ARGV[2],
                      'data', ARGV[3], 'user', ARGV[4], 'client', ARGV[5], 'offset', 0,
                      'epoch', '', 'ts', ARGV[6])
if #KEYS > 1 then redis.call('SET', KEYS[2], id, 'PX', ARGV[7]) end
return id
"""


# Every script, by the name the broker runs it with: a command connection loads them
# all (SCRIPT LOAD) when it connects, before anything else; the broker then runs them
# with EVALSHA, and with EVAL when Redis answers NOSCRIPT (flushed meanwhile).
SCRIPTS = {"publish": PUBLISH_LUA, "history": HISTORY_LUA, "logsince": LOG_SINCE_LUA,
           "join": PRESENCE_JOIN_LUA, "leave": PRESENCE_LEAVE_LUA,
           "presence": PRESENCE_GET_LUA, "prefresh": PRESENCE_REFRESH_LUA,
           "revoke": REVOKE_LUA, "lcconnect": LC_CONNECT_LUA,
           "lcdisconnect": LC_DISCONNECT_LUA, "lcsweep": LC_SWEEP_LUA,
           "sappend": STREAM_APPEND_LUA}

