"""Claim/answer records in Redis, as both the proxy (exchanges) and the API (idempotency keys)
keep them. Pure: the script text and how to read its replies; each side runs it with its own
client.

A record is claimed with ``SET key "c" NX PX lease GET`` and answered with
``SET key "d"+answer PX lifetime``. The reply to a claim says everything: nil — the caller owns
it; ``c`` — someone else is on it; ``d…`` — the answer.
"""

from __future__ import annotations

CLAIM = b"c"  # op code in BATCH_SCRIPT, and the value of a claimed record
ANSWER = b"a"  # op code in BATCH_SCRIPT
RELEASE = b"r"  # op code in BATCH_SCRIPT: drop a claim so a retry can go ahead
DONE = b"d"  # prefix of an answered record

# One record operation, as a Lua function other scripts can start with (api/admission.py runs
# it after device reads). A nil reply from SET ... GET arrives in Lua as false and goes back as
# nil.
RECORD_OP_LUA = """
local function record_op(key, op, value, ttl)
  if op == 'c' then
    return redis.call('SET', key, 'c', 'NX', 'PX', ttl, 'GET')
  elseif op == 'a' then
    redis.call('SET', key, value, 'PX', ttl)
    return 1
  end
  if redis.call('GET', key) == 'c' then redis.call('DEL', key) end
  return 1
end
"""

# ARGV holds (op, value, ttl_ms) per key. One call runs a whole batch: one socket write, one
# reply.
BATCH_SCRIPT = (
    RECORD_OP_LUA
    + """
local out = {}
for i = 1, #KEYS do
  out[i] = record_op(KEYS[i], ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i])
end
return out
"""
)

# One record operation: (op, key, value, ttl_ms).
RecordOp = tuple[bytes, str, bytes, int]


def record_argv(ops: list[RecordOp]) -> list[bytes | int]:
    """The ARGV of BATCH_SCRIPT (and of scripts that end with its loop) for ``ops``, whose keys
    go in KEYS in the same order."""
    argv: list[bytes | int] = []
    for op, _, value, ttl_ms in ops:
        argv += (op, value, ttl_ms)
    return argv


# RELEASE for one key, where BATCH_SCRIPT cannot run (Redis Cluster: its keys span slots).
RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == 'c' then redis.call('DEL', KEYS[1]) end return 1"


class Owned:
    """Reply marker: the caller holds the claim."""


class Busy:
    """Reply marker: another caller holds the claim and has not answered."""


OWNED = Owned()
BUSY = Busy()


def read_claim(reply: bytes | None) -> Owned | Busy | bytes:
    """What a claim's reply means: OWNED, BUSY, or the stored answer."""
    if reply is None:
        return OWNED
    if reply == CLAIM:
        return BUSY
    return bytes(reply[len(DONE) :])
