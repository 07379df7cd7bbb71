"""The pack's read-only server route."""

from __future__ import annotations

import logging
import sys

from .weights import ADAPTERS

log = logging.getLogger("ComfyUI-IPAdapter-Exact")


STATS_PATH = "/ipadapter_exact/stats"


def register_routes() -> bool:
    """Adds GET /ipadapter_exact/stats to the running server; False when there is no server."""
    # ComfyUI imports its `server` module before it loads custom nodes; never import it here
    # (that would start building a server inside a test process or a script).
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return False
    from aiohttp import web

    @prompt_server.routes.get(STATS_PATH)
    async def adapter_stats(request):
        # {"files_read": files actually read from disk, "live_adapters": weight sets alive,
        #  "cached_files": names of the cached files}
        return web.json_response(ADAPTERS.stats())

    log.debug("registered GET %s", STATS_PATH)
    return True
