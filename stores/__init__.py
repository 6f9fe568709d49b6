"""The state layer both sides share: what the CoAP front end (``proxy``) and the HTTP backend
(``api``) keep in Redis, and how they reach it.

``stores.ledger``: the exactly-once ledger (claim with a lease, record the answer, replay it):
the proxy's dedup and the API's Idempotency-Keys, each under its own prefix; memory, one server,
Sentinel or Cluster, chosen by the Redis URL.
``stores.keys``: the Redis key schema (one prefix per deployment, hash tags per slot).
``stores.redis_url``: which deployment a Redis URL names (one server, Sentinel, Cluster; pure).
``stores.redis``: the one factory of redis-py clients for such URLs.
``stores.resp``: one Redis connection for script calls on the hot paths (RESP2, pipelined), where
a general library costs too much CPU per call.
``stores.deferred``: records that ride with the next call instead of making their own.

It depends on nothing of ours; ``proxy`` and ``api`` import it and still never import each other.
"""
