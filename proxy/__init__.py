"""The CoAP front end: codec, messaging layer, transports and forwarding to HTTP."""
