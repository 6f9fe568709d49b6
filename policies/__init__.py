"""Pure rules shared by the CoAP front end (``proxy``) and the HTTP backend (``api``).

Nothing in this package performs I/O or imports asyncio: it is data and functions over data,
so both sides can import it and agree on every table, key and header name.
"""
