"""The HTTP backend of coap-bridge: telemetry ingest to MQTT and the device registry.

The public surface is :func:`api.app.create_app` and :class:`api.settings.ApiSettings`; the
proxy reaches this package only over HTTP (docs/CONTRACT.md §11), never by import.
"""
