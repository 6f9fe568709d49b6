"""The web console at ``/console`` (docs/OPERATIONS.md, "Console"): devices, PSKs, locations,
a live view of published messages and a "send as device" form, server-rendered, with a small
hand-written script and stylesheet shipped in this package (no build step, nothing fetched
from elsewhere)."""

from api.console.routes import router

__all__ = ["router"]
