"""CoAP (RFC 7252) message layer, arranged like the RFC: codec, options, messaging."""
