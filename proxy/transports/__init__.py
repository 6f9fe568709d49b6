"""Transports under the CoAP messaging layer: plain UDP is asyncio's own; DTLS is ``dtls``."""
