"""The token registry: the HTTP API apps register devices with, cleanup and hygiene."""
