"""What the CoAP front end (``proxy``) and the HTTP backend (``api``) both use on their hot
paths to reach Redis, where a general library costs too much CPU per call.

``links.resp``: one Redis connection for script calls (RESP2, pipelined).
``links.deferred``: records that ride with the next call instead of making their own.

It depends on nothing of ours; ``proxy`` and ``api`` import it and still never import each other.
"""
