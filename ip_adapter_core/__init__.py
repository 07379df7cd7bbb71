"""Pure torch + einops math for IP-Adapter: layer layout, image attention, controls.

Nothing here imports the host (ComfyUI); the nodes package adapts it.
"""
