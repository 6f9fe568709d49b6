"""The ``coap-bridge`` command: the only place that knows both the proxy and the API."""
