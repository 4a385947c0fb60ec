"""KV-aware router: send each call to the worker that already holds its context (see server.py)."""
