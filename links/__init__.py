"""What the CoAP front end (``proxy``) and the HTTP backend (``api``) both use to reach Redis.

``links.redis_url``: which deployment a Redis URL names (one server, Sentinel, Cluster; pure).
``links.redis``: the redis-py clients of both sides' stores, built from such a URL.
``links.resp``: one Redis connection for script calls on the hot paths (RESP2, pipelined), where
a general library costs too much CPU per call.
``links.deferred``: records that ride with the next call instead of making their own.

It depends on nothing of ours; ``proxy`` and ``api`` import it and still never import each other.
"""
