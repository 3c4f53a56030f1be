"""The queen's OpenAI-compatible HTTP front: /v1/models, /v1/chat/completions, /v1/completions.

`params` reads a request body into an InferRequest (pure), `shapes` writes chunks and results
as OpenAI's API does (pure), `app` is the Starlette application (requests go through the same
admission, desk, failover, history, events and metrics as gRPC Infer). Errors and sending are
the HTTP side's (`queen/http/errors.py`, `queen/http/asgi.py`); queen/http/server.py runs it.
"""
