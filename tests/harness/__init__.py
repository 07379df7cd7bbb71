"""Test host for ComfyUI-IPAdapter-Exact: boots a real ComfyUI around the pack (test code only)."""
