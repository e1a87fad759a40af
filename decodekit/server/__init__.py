"""``decodekit serve``: an OpenAI-compatible HTTP server (FastAPI app, one generation worker, Prometheus metrics)."""

from decodekit.server.app import create_app

__all__ = ["create_app"]
