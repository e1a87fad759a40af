"""``decodekit serve``: an OpenAI-compatible HTTP server (FastAPI app in app.py, one generation worker, Prometheus
metrics). The package imports nothing itself, so the CLI's other commands never load FastAPI."""
