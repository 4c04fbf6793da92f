"""The Redis state store: keys under one prefix, for replicas on several nodes.

The job queue: a sorted set of waiting job ids per owner (by creation time), a sorted set of the owners
with jobs waiting (by the turn each was last served, 0 for never: the lowest goes next), and a sorted set
of lease deadlines that any process scans for lapsed leases. Every step is one Lua script.
"""

from __future__ import annotations

import functools
import json
import time

from octoflux.state.records import FAILED, FINAL, PENDING, RUNNING, Delivery, JobRecord, LeasedJob
from octoflux.state.store import (
    DELIVERY_FIELDS,
    EVENTS_KEPT,
    JOB_FIELDS,
    LOST_ERROR_STATUS,
    RecordNotFound,
    StateStore,
    StateStoreError,
    StatusConflict,
    check_final_status,
    expected_statuses,
    redact_url,
)

_FINAL_LUA = "{" + ", ".join(f"{s} = true" for s in FINAL) + "}"

# KEYS: record hash, index zset. ARGV: member, score, field/value pairs. 0 when the record exists.
_LUA_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""
_LUA_MARK_RUNNING = f"""
if redis.call('HGET', KEYS[1], 'status') ~= '{PENDING}' then return 0 end
redis.call('HSET', KEYS[1], 'status', '{RUNNING}')
return 1
"""
# KEYS: job, body, active zset, finished zset, leases zset, request, queue key prefix.
# ARGV: id, has body, body, finished_at, field/value pairs.
_LUA_FINISH = f"""
local final = {_FINAL_LUA}
local status = redis.call('HGET', KEYS[1], 'status')
if not status or final[status] then return 0 end
redis.call('HDEL', KEYS[1], 'error', 'error_status', 'lease_until')
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[3]) end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('DEL', KEYS[6])
redis.call('ZREM', KEYS[7] .. (redis.call('HGET', KEYS[1], 'owner') or ''), ARGV[1])
return 1
"""
# Puts job `id` (hash at `key`) back in its owner's queue; the owner keeps its turn. An owner never
# served scores below every turn, ordered by when its job came (as SQLite orders them).
_LUA_REQUEUE = """
local function requeue(id, key, queues, owners, turns)
  local job = redis.call('HMGET', key, 'owner', 'created_at')
  local owner = job[1] or ''
  redis.call('ZADD', queues .. owner, job[2], id)
  local turn = redis.call('HGET', turns, owner) or (tonumber(job[2]) - 1e12)
  redis.call('ZADD', owners, 'NX', turn, owner)
end
"""
# KEYS: job, request, active zset, idempotency key. ARGV: id, created_at, request, oldest kept finish,
# queue key prefix, owners zset, turns hash, job key prefix, field/value pairs. Returns the job's id.
_LUA_ENQUEUE = (
    _LUA_REQUEUE
    + """
local held = KEYS[4] ~= '' and redis.call('GET', KEYS[4])
if held then
  local finished = redis.call('HGET', ARGV[8] .. held, 'finished_at')
  if redis.call('EXISTS', ARGV[8] .. held) == 1 and (not finished or tonumber(finished) >= tonumber(ARGV[4]))
  then return held end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('SET', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1]) end
requeue(ARGV[1], KEYS[1], ARGV[5], ARGV[6], ARGV[7])
return ARGV[1]
"""
)
# KEYS: owners zset, turns hash, turn counter, leases zset. ARGV: lease end, replica, queue key prefix,
# job key prefix, request key prefix. Returns {job hash as a flat list, request} or nothing.
_LUA_LEASE = f"""
while true do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #first == 0 then return false end
  local owner = first[1]
  local queue = ARGV[3] .. owner
  local next = redis.call('ZRANGE', queue, 0, 0)
  if #next == 0 then
    redis.call('ZREM', KEYS[1], owner)
  else
    local id = next[1]
    redis.call('ZREM', queue, id)
    if redis.call('ZCARD', queue) == 0 then redis.call('ZREM', KEYS[1], owner) end
    local key = ARGV[4] .. id
    local job = redis.call('HMGET', key, 'status', 'lease_until')
    if job[1] == '{PENDING}' and not job[2] then
      local turn = redis.call('INCR', KEYS[3])
      redis.call('HSET', KEYS[2], owner, turn)
      redis.call('ZADD', KEYS[1], 'XX', turn, owner)
      redis.call('HSET', key, 'replica', ARGV[2], 'lease_until', ARGV[1])
      redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('ZADD', KEYS[4], ARGV[1], id)
      return {{redis.call('HGETALL', key), redis.call('GET', ARGV[5] .. id)}}
    end
  end
end
"""
# KEYS: job, leases zset. ARGV: id, replica, lease end.
_LUA_RENEW = """
local job = redis.call('HMGET', KEYS[1], 'replica', 'lease_until')
if job[1] ~= ARGV[2] or not job[2] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
# KEYS: job, leases zset. ARGV: id, replica, queue key prefix, owners zset, turns hash.
_LUA_RELEASE = (
    _LUA_REQUEUE
    + f"""
local job = redis.call('HMGET', KEYS[1], 'replica', 'lease_until', 'attempts')
if job[1] ~= ARGV[2] or not job[2] then return 0 end
redis.call('HDEL', KEYS[1], 'lease_until')
redis.call('HSET', KEYS[1], 'status', '{PENDING}', 'attempts', math.max(tonumber(job[3] or 1) - 1, 0))
redis.call('ZREM', KEYS[2], ARGV[1])
requeue(ARGV[1], KEYS[1], ARGV[3], ARGV[4], ARGV[5])
return 1
"""
)
# KEYS: leases zset, active zset, finished zset. ARGV: now, max attempts, reason, error status,
# job key prefix, request key prefix, queue key prefix, owners zset, turns hash. Returns the ids failed.
_LUA_RECLAIM = (
    _LUA_REQUEUE
    + f"""
local failed = {{}}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[5] .. id
  local job = redis.call('HMGET', key, 'status', 'attempts', 'lease_until')
  if (job[1] == '{PENDING}' or job[1] == '{RUNNING}') and job[3] then
    redis.call('HDEL', key, 'lease_until')
    if tonumber(job[2] or 0) >= tonumber(ARGV[2]) then
      redis.call('HSET', key, 'status', '{FAILED}', 'error', ARGV[3], 'error_status', ARGV[4],
                 'finished_at', ARGV[1])
      redis.call('DEL', ARGV[6] .. id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZADD', KEYS[3], ARGV[1], id)
      failed[#failed + 1] = id
    else
      redis.call('HSET', key, 'status', '{PENDING}')
      requeue(id, key, ARGV[7], ARGV[8], ARGV[9])
    end
  end
end
return failed
"""
)
_LUA_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
return 1
"""
# KEYS: job, events list. ARGV: encoded event, events kept. 0 when the job is unknown.
_LUA_APPEND_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
redis.call('RPUSH', KEYS[2], seq .. ' ' .. ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
return seq
"""
# KEYS: assets set. ARGV: new id, encoded record, name, asset key prefix, live statuses...
_LUA_CREATE_ASSET = """
local live = {}
for i = 5, #ARGV do live[ARGV[i]] = true end
local superseded = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local raw = redis.call('GET', ARGV[4] .. id)
  if raw then
    local other = cjson.decode(raw)
    if other['name'] == ARGV[3] then
      if live[other['status']] then return 0 end
      superseded[#superseded + 1] = id
    end
  end
end
for _, id in ipairs(superseded) do
  redis.call('DEL', ARGV[4] .. id)
  redis.call('SREM', KEYS[1], id)
end
redis.call('SET', ARGV[4] .. ARGV[1], ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""
# KEYS: due zset. ARGV: now, lease end, limit, delivery key prefix. Returns the claimed hashes.
_LUA_CLAIM = """
local claimed = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  redis.call('HSET', ARGV[4] .. id, 'next_attempt_at', ARGV[2])
  claimed[#claimed + 1] = redis.call('HGETALL', ARGV[4] .. id)
end
return claimed
"""
# KEYS: delivery, due zset, done zset. ARGV: id, status, next_attempt_at, field/value pairs.
_LUA_UPDATE_DELIVERY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'last_error')
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] == 'pending' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
end
return 1
"""

_JOB_TYPES = {
    "created_at": float,
    "finished_at": float,
    "error_status": int,
    "attempts": int,
    "lease_until": float,
}
_DELIVERY_TYPES = {"created_at": float, "next_attempt_at": float, "attempts": int}
_REDIS_CONNECT_TIMEOUT_S = 2.0
_REDIS_SOCKET_TIMEOUT_S = 10.0


def _pairs(values: dict) -> list:
    """Field/value pairs for HSET; None values are left out (absent fields read back as None)."""
    return [item for key, value in values.items() if value is not None for item in (key, value)]


def _decode(raw: dict[bytes, bytes], names: tuple[str, ...], types: dict, keep_bytes=()) -> dict:
    values = {}
    for name in names:
        value = raw.get(name.encode())
        if value is not None and name not in keep_bytes:
            value = types.get(name, bytes.decode)(value)
        values[name] = value
    return values


def _job(raw: dict[bytes, bytes]) -> JobRecord:
    return JobRecord(**_decode(raw, JOB_FIELDS, _JOB_TYPES))


def _redis_reason(exc: Exception) -> str:
    """'connection refused' out of redis-py's 'Error 111 connecting to host:port. Connection refused.'"""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    text = str(exc).strip().rstrip(".")
    if type(exc).__name__ == "ResponseError":  # the server's own reply: its first sentence says what
        return text.split(". ", 1)[0] or type(exc).__name__
    return (text.rsplit(". ", 1)[-1] if ". " in text else text).lower() or type(exc).__name__


def _redis_errors(method):
    """Redis failures after startup surface as StateStoreError, like every other store failure."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except self._redis.RedisError as exc:
            raise StateStoreError(f"Redis at {self.url} failed: {_redis_reason(exc)}") from exc

    return wrapped


class RedisStateStore(StateStore):
    """Redis keys under one prefix; read-check-write updates are Lua scripts (atomic on the server)
    or WATCH/MULTI transactions; result links expire by Redis TTL."""

    def __init__(self, url: str, prefix: str = "octoflux:"):
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            missing = "a redis:// state URL needs the redis package: pip install '.[ray]'"
            raise StateStoreError(missing) from None
        self._redis = redis
        self.url = redact_url(url)
        self.prefix = prefix
        options = {
            "socket_connect_timeout": _REDIS_CONNECT_TIMEOUT_S,
            "socket_timeout": _REDIS_SOCKET_TIMEOUT_S,
        }
        try:
            # A single try at startup: a wrong address fails within the connect timeout, not retries.
            with redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0), **options) as probe:
                probe.ping()
            self.client = redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=1.0), 3), **options)
        except redis.AuthenticationError as exc:
            raise StateStoreError(f"Redis at {self.url} refused the credentials: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StateStoreError(f"cannot reach Redis at {self.url}: {_redis_reason(exc)}") from None
        except (redis.RedisError, ValueError) as exc:
            raise StateStoreError(f"cannot use Redis at {self.url}: {exc}") from None
        register = self.client.register_script
        self._create = register(_LUA_CREATE)
        self._mark_running = register(_LUA_MARK_RUNNING)
        self._finish = register(_LUA_FINISH)
        self._enqueue = register(_LUA_ENQUEUE)
        self._lease = register(_LUA_LEASE)
        self._renew = register(_LUA_RENEW)
        self._release = register(_LUA_RELEASE)
        self._reclaim = register(_LUA_RECLAIM)
        self._cancel = register(_LUA_CANCEL)
        self._append_event = register(_LUA_APPEND_EVENT)
        self._claim = register(_LUA_CLAIM)
        self._create_asset = register(_LUA_CREATE_ASSET)
        self._update_delivery = register(_LUA_UPDATE_DELIVERY)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------ async jobs

    @_redis_errors
    def create_job(self, rec: JobRecord) -> None:
        values = {name: getattr(rec, name) for name in JOB_FIELDS}
        if rec.status in FINAL:
            index, score = self._key("jobs", "finished"), rec.finished_at or rec.created_at
        else:
            index, score = self._key("jobs", "active"), rec.created_at
        if not self._create(keys=[self._key("job", rec.id), index], args=[rec.id, score, *_pairs(values)]):
            raise StateStoreError(f"job {rec.id} already exists")

    @_redis_errors
    def get_job(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(self._key("job", job_id))
        return _job(raw) if raw else None

    def _queue_args(self) -> list[str]:
        return [self._key("queue", ""), self._key("queue", "owners"), self._key("queue", "turns")]

    def _idempotency_key(self, owner: str | None, key: str | None) -> str:
        return self._key("idempotency", owner or "", key) if key is not None else ""

    @_redis_errors
    def enqueue_job(
        self, rec: JobRecord, request: bytes, ttl_s: float, now: float | None = None
    ) -> JobRecord:
        now = time.time() if now is None else now
        values = {name: getattr(rec, name) for name in JOB_FIELDS}
        keys = [
            self._key("job", rec.id),
            self._key("request", rec.id),
            self._key("jobs", "active"),
            self._idempotency_key(rec.owner, rec.idempotency_key),
        ]
        args = [rec.id, rec.created_at, request, now - ttl_s, *self._queue_args(), self._key("job", "")]
        job_id = self._enqueue(keys=keys, args=args + _pairs(values))
        if job_id is None:
            raise StateStoreError(f"job {rec.id} already exists")
        if job_id.decode() == rec.id:
            return rec
        return self.get_job(job_id.decode()) or rec

    @_redis_errors
    def idempotent_job(
        self, owner: str | None, key: str, ttl_s: float, now: float | None = None
    ) -> JobRecord | None:
        now = time.time() if now is None else now
        held = self.client.get(self._idempotency_key(owner, key))
        job = self.get_job(held.decode()) if held is not None else None
        if job is None or (job.finished_at is not None and job.finished_at < now - ttl_s):
            return None
        return job

    @_redis_errors
    def lease_job(self, replica: str, lease_s: float, now: float | None = None) -> LeasedJob | None:
        now = time.time() if now is None else now
        keys = [
            self._key("queue", "owners"),
            self._key("queue", "turns"),
            self._key("queue", "turn"),
            self._key("jobs", "leases"),
        ]
        args = [
            now + lease_s,
            replica,
            self._key("queue", ""),
            self._key("job", ""),
            self._key("request", ""),
        ]
        leased = self._lease(keys=keys, args=args)
        if not leased:
            return None
        flat, request = leased
        return LeasedJob(_job(dict(zip(flat[::2], flat[1::2], strict=True))), request or b"")

    @_redis_errors
    def renew_lease(self, job_id: str, replica: str, lease_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        keys = [self._key("job", job_id), self._key("jobs", "leases")]
        return bool(self._renew(keys=keys, args=[job_id, replica, now + lease_s]))

    @_redis_errors
    def release_job(self, job_id: str, replica: str) -> bool:
        keys = [self._key("job", job_id), self._key("jobs", "leases")]
        return bool(self._release(keys=keys, args=[job_id, replica, *self._queue_args()]))

    @_redis_errors
    def reclaim_lapsed(self, max_attempts: int, reason: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        keys = [self._key("jobs", "leases"), self._key("jobs", "active"), self._key("jobs", "finished")]
        args = [now, max_attempts, reason, LOST_ERROR_STATUS, self._key("job", ""), self._key("request", "")]
        return [i.decode() for i in self._reclaim(keys=keys, args=args + self._queue_args())]

    @_redis_errors
    def queued_count(self) -> int:
        owners = self.client.zrange(self._key("queue", "owners"), 0, -1)
        with self.client.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.zcard(self._key("queue", owner.decode()))
            return sum(pipe.execute())

    @_redis_errors
    def mark_running(self, job_id: str) -> bool:
        return bool(self._mark_running(keys=[self._key("job", job_id)]))

    @_redis_errors
    def finish_job(self, job_id, status, *, body=None, error=None, error_status=None) -> bool:
        check_final_status(status)
        now = time.time()
        values = {"status": status, "finished_at": now, "error": error, "error_status": error_status}
        keys = [
            self._key("job", job_id),
            self._key("body", job_id),
            self._key("jobs", "active"),
            self._key("jobs", "finished"),
            self._key("jobs", "leases"),
            self._key("request", job_id),
            self._key("queue", ""),
        ]
        args = [job_id, "1" if body is not None else "0", body if body is not None else b"", now]
        return bool(self._finish(keys=keys, args=args + _pairs(values)))

    @_redis_errors
    def get_body(self, job_id: str) -> bytes | None:
        return self.client.get(self._key("body", job_id))

    @_redis_errors
    def sweep(self, ttl_s: float, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - ttl_s
        finished = self._key("jobs", "finished")
        ids = [i.decode() for i in self.client.zrangebyscore(finished, "-inf", f"({cutoff!r}")]
        done = self._key("deliveries", "done")
        deliveries = [i.decode() for i in self.client.zrangebyscore(done, "-inf", f"({cutoff!r}")]
        beats = self.client.hgetall(self._key("replicas"))
        stale = [name for name, beat in beats.items() if float(beat) < cutoff]
        loads = self.client.hgetall(self._key("replica_loads"))
        stale_loads = [name for name, raw in loads.items() if json.loads(raw)[0] < cutoff]
        claims = []  # the Idempotency-Keys the swept jobs held
        for job_id in ids:
            owner, key = self.client.hmget(self._key("job", job_id), "owner", "idempotency_key")
            claim = self._idempotency_key(owner.decode() if owner else None, key.decode()) if key else None
            if claim and self.client.get(claim) == job_id.encode():  # not yet taken over by a new job
                claims.append(claim)
        with self.client.pipeline() as pipe:  # MULTI/EXEC
            for job_id in ids:
                pipe.delete(self._key("job", job_id), self._key("body", job_id), self._key("events", job_id))
                pipe.delete(self._key("request", job_id))
            for claim in claims:
                pipe.delete(claim)
            if ids:
                pipe.zrem(finished, *ids)
            for delivery_id in deliveries:
                pipe.delete(self._key("delivery", delivery_id))
            if deliveries:
                pipe.zrem(done, *deliveries)
            if stale:
                pipe.hdel(self._key("replicas"), *stale)
            if stale_loads:
                pipe.hdel(self._key("replica_loads"), *stale_loads)
            pipe.execute()
        return len(ids)

    # ------------------------------------------------------------ replicas

    @_redis_errors
    def heartbeat(self, replica: str, now: float | None = None) -> None:
        self.client.hset(self._key("replicas"), replica, time.time() if now is None else now)

    @_redis_errors
    def put_replica_load(self, replica: str, load: dict, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.client.hset(self._key("replica_loads"), replica, json.dumps([now, load]))

    @_redis_errors
    def replica_loads(self, max_age_s: float, now: float | None = None) -> dict[str, dict]:
        now = time.time() if now is None else now
        loads = {}
        for name, raw in self.client.hgetall(self._key("replica_loads")).items():
            at, load = json.loads(raw)
            if at >= now - max_age_s:
                loads[name.decode()] = load
        return loads

    # ------------------------------------------------------------ cancellation

    @_redis_errors
    def request_cancel(self, job_id: str) -> bool:
        return bool(self._cancel(keys=[self._key("job", job_id)]))

    @_redis_errors
    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(self._key("job", job_id), "cancel_requested") == b"1"

    # ------------------------------------------------------------ progress events

    @_redis_errors
    def append_event(self, job_id: str, event: dict) -> int:
        keys = [self._key("job", job_id), self._key("events", job_id)]
        seq = self._append_event(keys=keys, args=[json.dumps(event), EVENTS_KEPT])
        if not seq:
            raise RecordNotFound(job_id)
        return int(seq)

    @_redis_errors
    def events_after(self, job_id: str, seq: int) -> list[tuple[int, dict]]:
        events = []
        for item in self.client.lrange(self._key("events", job_id), 0, -1):
            number, encoded = item.split(b" ", 1)
            if int(number) > seq:
                events.append((int(number), json.loads(encoded)))
        return events

    # ------------------------------------------------------------ assets

    @_redis_errors
    def put_asset(self, asset_id: str, record: dict) -> None:
        with self.client.pipeline() as pipe:
            pipe.set(self._key("asset", asset_id), json.dumps(record))
            pipe.sadd(self._key("assets"), asset_id)
            pipe.execute()

    @_redis_errors
    def create_asset(self, record: dict, live_statuses: set[str]) -> bool:
        args = [record["id"], json.dumps(record), record["name"], self._key("asset", "")]
        args += sorted(live_statuses)
        return bool(self._create_asset(keys=[self._key("assets")], args=args))

    @_redis_errors
    def get_asset(self, asset_id: str) -> dict | None:
        raw = self.client.get(self._key("asset", asset_id))
        return json.loads(raw) if raw is not None else None

    @_redis_errors
    def list_assets(self) -> list[dict]:
        ids = sorted(i.decode() for i in self.client.smembers(self._key("assets")))
        if not ids:
            return []
        raws = self.client.mget([self._key("asset", i) for i in ids])
        return [json.loads(raw) for raw in raws if raw is not None]

    @_redis_errors
    def delete_asset(self, asset_id: str) -> bool:
        with self.client.pipeline() as pipe:
            pipe.delete(self._key("asset", asset_id))
            pipe.srem(self._key("assets"), asset_id)
            deleted, _ = pipe.execute()
        return deleted == 1

    @_redis_errors
    def update_asset(self, asset_id, expected_status, changes) -> dict:
        expected = expected_statuses(expected_status)
        key = self._key("asset", asset_id)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # EXEC fails if another client writes the key before it
                    raw = pipe.get(key)
                    if raw is None:
                        raise RecordNotFound(asset_id)
                    record = json.loads(raw)
                    if expected is not None and record.get("status") not in expected:
                        raise StatusConflict(asset_id, record.get("status"), expected)
                    record.update(changes)
                    pipe.multi()
                    pipe.set(key, json.dumps(record))
                    pipe.execute()
                    return record
                except self._redis.WatchError:
                    continue  # someone else changed it: read again and re-check

    # ------------------------------------------------------------ webhook deliveries

    def _delivery_index(self, status: str) -> str:
        return self._key("deliveries", "due" if status == "pending" else "done")

    @_redis_errors
    def add_delivery(self, d: Delivery) -> None:
        values = {name: getattr(d, name) for name in DELIVERY_FIELDS}
        score = d.next_attempt_at if d.status == "pending" else d.created_at
        keys = [self._key("delivery", d.id), self._delivery_index(d.status)]
        # An id already stored keeps its first version: enqueueing the same message twice is one message.
        self._create(keys=keys, args=[d.id, score, *_pairs(values)])

    def _delivery(self, raw: dict[bytes, bytes]) -> Delivery:
        return Delivery(**_decode(raw, DELIVERY_FIELDS, _DELIVERY_TYPES, keep_bytes=("payload",)))

    @_redis_errors
    def claim_due_deliveries(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        keys = [self._key("deliveries", "due")]
        claimed = self._claim(keys=keys, args=[now, now + lease_s, limit, self._key("delivery", "")])
        return [self._delivery(dict(zip(flat[::2], flat[1::2], strict=True))) for flat in claimed]

    @_redis_errors
    def update_delivery(self, delivery_id, *, attempts, next_attempt_at, status, last_error) -> bool:
        values = {"attempts": attempts, "next_attempt_at": next_attempt_at, "status": status}
        values["last_error"] = last_error
        keys = [
            self._key("delivery", delivery_id),
            self._key("deliveries", "due"),
            self._key("deliveries", "done"),
        ]
        args = [delivery_id, status, next_attempt_at, *_pairs(values)]
        return bool(self._update_delivery(keys=keys, args=args))

    @_redis_errors
    def get_delivery(self, delivery_id: str) -> Delivery | None:
        raw = self.client.hgetall(self._key("delivery", delivery_id))
        return self._delivery(raw) if raw else None

    # ------------------------------------------------------------ result links

    @_redis_errors
    def put_link(self, token: str, image: bytes, media_type: str, expires_at: float) -> None:
        key = self._key("link", token)
        if expires_at <= time.time():
            self.client.delete(key)
            return
        pipe = self.client.pipeline()
        pipe.hset(key, mapping={"image": image, "media_type": media_type, "expires_at": expires_at})
        pipe.pexpireat(key, int(expires_at * 1000) + 1)
        pipe.execute()

    @_redis_errors
    def get_link(self, token: str, now: float | None = None) -> tuple[bytes, str] | None:
        raw = self.client.hgetall(self._key("link", token))
        if not raw:
            return None
        expires_at = float(raw[b"expires_at"])
        if expires_at <= (time.time() if now is None else now):
            return None
        return raw[b"image"], raw[b"media_type"].decode()
