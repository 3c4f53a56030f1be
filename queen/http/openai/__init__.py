"""The queen's OpenAI-compatible HTTP front: /v1/models, /v1/chat/completions, /v1/completions.

`params` reads a request body into an InferRequest (pure), `shapes` writes chunks, results and
errors as OpenAI's API does (pure), `app` is the Starlette application (requests go through
the same admission, scheduler, failover, history, events and metrics as gRPC Infer), and
`server` runs it with uvicorn on the queen's own event loop.
"""
