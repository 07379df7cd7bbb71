"""ComfyUI-IPAdapter-Exact: IP-Adapter image prompts for SD1.5 and SDXL, checked against diffusers."""

import logging

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

logging.getLogger("ComfyUI-IPAdapter-Exact").info(
    "ComfyUI-IPAdapter-Exact: loaded %d nodes", len(NODE_CLASS_MAPPINGS)
)
