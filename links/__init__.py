"""Small network clients that both the CoAP front end (``proxy``) and the HTTP backend
(``api``) use on their hot paths, where a general library costs too much CPU per call.

``links.resp``: one Redis connection for script calls (RESP2, pipelined). It depends on nothing
of ours; ``proxy`` and ``api`` import it and still never import each other.
"""
