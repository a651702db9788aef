"""store/keyspace.py: the Redis key space of one gateway cluster: key names, the Lua scripts
that change it atomically, and the parsing of what Redis answers.

In: a cluster name; raw replies from redis-py. Out: key prefixes, script texts, and the
state, change-log entries and stream rows as ``store`` values. Shared by ``RedisStore``
(sync, worker threads) and ``ChangeFollower`` (async, the event loop), so both read one
layout. Speaks only the RESP subset that Valkey shares, and the Lua 5.1 ``bit`` library
both ship. Knows nothing of connections, policies or decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from gateway.errors import InvalidInputError
from gateway.store.protocol import ControlSnapshot, ModelState
from gateway.types import Route

__all__ = [
    "ACQUIRE_SCRIPT",
    "COMMIT_SCRIPT",
    "RENEW_SCRIPT",
    "SNAPSHOT_SCRIPT",
    "as_bytes",
    "as_entries",
    "as_fields",
    "change_from_fields",
    "key_prefix",
    "parse_state",
]

_route_decoder: Final = msgspec.json.Decoder(Route)

# SHA-256 in Lua 5.1 with the ``bit`` library (both Redis and Valkey ship it): the script
# hashes each audit entry on the head it reads itself, so appends never race on the head.
# Checked against hashlib by every test that verifies a chain this store wrote.
_SHA256: Final = """
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit = bit.rshift, bit.lshift, bit.ror, bit.tobit
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2}
local function sha256(msg)
  local len = #msg
  local bits = len * 8
  msg = msg .. '\\128' .. string.rep('\\0', (64 - (len + 9) % 64) % 64)
    .. string.char(0, 0, 0, 0, band(rshift(bits, 24), 255), band(rshift(bits, 16), 255),
                   band(rshift(bits, 8), 255), band(bits, 255))
  local H = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}
  local w = {}
  for i = 1, #msg, 64 do
    for j = 0, 15 do
      local b1, b2, b3, b4 = string.byte(msg, i + j * 4, i + j * 4 + 3)
      w[j] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
    end
    for j = 16, 63 do
      local x, y = w[j - 15], w[j - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[j] = tobit(w[j - 16] + s0 + w[j - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
    for j = 0, 63 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = h + S1 + ch + K[j + 1] + w[j]
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + S0 + maj)
    end
    H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
    H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
  end
  local out = {}
  for i = 1, 8 do out[i] = bit.tohex(H[i], 8) end
  return table.concat(out)
end
"""

# KEYS: state, changes, audit, audit:head, leader
# ARGV: model, expected version|'', token|'', has event '0'|'1', the entry's canonical JSON in
#       three parts around its prev_hash and seq, has route '0'|'1', route JSON,
#       has rollout '0'|'1', rollout bytes, change-log maxlen, a fresh epoch (kept only if
#       the store has none: first use, or wiped)
# Returns {'ok', model version, global version, seq|'', prev hash|'', hash|''} or an error
# status: {'fenced', current lease|''}, {'version', current version}.
COMMIT_SCRIPT: Final = (
    _SHA256
    + """
if ARGV[3] ~= '' then
  local cur = redis.call('GET', KEYS[5])
  if (not cur) or (string.match(cur, '^(%d+) ') ~= ARGV[3]) then
    return {'fenced', cur or ''}
  end
end
local model = ARGV[1]
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver:' .. model) or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= ver then
  return {'version', tostring(ver)}
end
local g = redis.call('HGET', KEYS[1], 'version') or '0'
if ARGV[8] == '1' or ARGV[10] == '1' then
  redis.call('HSETNX', KEYS[1], 'epoch', ARGV[13])
  ver = ver + 1
  redis.call('HSET', KEYS[1], 'ver:' .. model, ver)
  if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'route:' .. model, ARGV[9]) end
  if ARGV[10] == '1' then redis.call('HSET', KEYS[1], 'rollout:' .. model, ARGV[11]) end
  g = redis.call('HINCRBY', KEYS[1], 'version', 1)
  local fields = {'model', model, 'v', ver, 'g', g}
  local route = redis.call('HGET', KEYS[1], 'route:' .. model)
  if route then table.insert(fields, 'route'); table.insert(fields, route) end
  local rollout = redis.call('HGET', KEYS[1], 'rollout:' .. model)
  if rollout then table.insert(fields, 'rollout'); table.insert(fields, rollout) end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[12], '*', unpack(fields))
end
local seq, prev, hash = '', '', ''
if ARGV[4] == '1' then
  local head = redis.call('HMGET', KEYS[4], 'seq', 'hash')
  seq = tostring(tonumber(head[1] or '0') + 1)
  prev = head[2] or string.rep('0', 64)
  local canonical = ARGV[5] .. prev .. ARGV[6] .. seq .. ARGV[7]
  hash = sha256(canonical)
  redis.call('XADD', KEYS[3], seq .. '-1', 'c', canonical, 'h', hash)
  redis.call('HSET', KEYS[4], 'seq', seq, 'hash', hash)
end
return {'ok', tostring(ver), tostring(g), seq, prev, hash}
"""
)

# KEYS: leader, leader:token. ARGV: holder, ttl ms. Returns the token, or false if taken.
ACQUIRE_SCRIPT: Final = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local token, holder = string.match(cur, '^(%d+) (.*)$')
  if holder ~= ARGV[1] then return false end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(token)
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return token
"""

# KEYS: leader. ARGV: "<token> <holder>", ttl ms (renew) or '' (release).
RENEW_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: state, changes. Every model's state and the change log's last id, atomically.
SNAPSHOT_SCRIPT: Final = """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local id = '0-0'
if last[1] then id = last[1][1] end
return {id, redis.call('HGETALL', KEYS[1])}
"""


def key_prefix(cluster: str) -> str:
    """All keys of one cluster share this prefix and its hash tag (one Redis Cluster slot)."""
    if not cluster or any(c in cluster for c in "{}: "):
        raise InvalidInputError(
            f"cluster name '{cluster}' must be non-empty without {{}}: or space"
        )
    return f"gw:{{{cluster}}}:"


# redis-py types replies as ``bytes | str`` (and streams loosely); with decode_responses off
# (the default, used here) they are bytes. These narrow them once, at the boundary.
def as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"unexpected redis reply {type(value).__name__}")


def as_fields(value: object) -> dict[bytes, bytes]:
    if isinstance(value, dict):
        return {as_bytes(k): as_bytes(v) for k, v in value.items()}
    if isinstance(value, list):  # a flat [k1, v1, k2, v2...] reply from a script
        return {as_bytes(k): as_bytes(v) for k, v in zip(value[::2], value[1::2], strict=True)}
    raise TypeError(f"unexpected redis reply {type(value).__name__}")


def as_entries(value: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries: [(id, {field: value})]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"unexpected redis reply {type(value).__name__}")
    return [(as_bytes(raw_id), as_fields(fields or {})) for raw_id, fields in value]


def parse_state(fields: Mapping[bytes, bytes]) -> ControlSnapshot:
    """A ``ControlSnapshot`` from the ``state`` hash's fields (shared with the follower)."""
    versions: dict[str, int] = {}
    routes: dict[str, Route] = {}
    rollouts: dict[str, bytes] = {}
    for raw_key, value in fields.items():
        key = raw_key.decode()
        kind, _, model = key.partition(":")
        if kind == "ver":
            versions[model] = int(value)
        elif kind == "route":
            routes[model] = _route_decoder.decode(value)
        elif kind == "rollout":
            rollouts[model] = bytes(value)
    models = {
        m: ModelState(
            model=m, version=versions.get(m, 0), route=routes.get(m), rollout=rollouts.get(m)
        )
        for m in sorted(set(versions) | set(routes) | set(rollouts))
    }
    return ControlSnapshot(
        version=int(fields.get(b"version", b"0")),
        epoch=fields.get(b"epoch", b"").decode(),
        models=models,
    )


def change_from_fields(fields: Mapping[bytes, bytes]) -> ModelState:
    """A change-log entry as the model's new state (shared with the follower)."""
    route = fields.get(b"route")
    return ModelState(
        model=fields[b"model"].decode(),
        version=int(fields[b"v"]),
        route=None if route is None else _route_decoder.decode(route),
        rollout=fields.get(b"rollout"),
    )
