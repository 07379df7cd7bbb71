"""The learned IP-Adapter modules, built from a state dict."""
