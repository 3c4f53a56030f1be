"""The operator dashboard the queen serves beside its OpenAI front: a page (`static/`) that
shows the cluster live and acts on it through the same admin RPCs as the CLI.

`series` keeps the 15-minute chart (pure), `forms` reads what the page sends (pure),
`gate` decides who may call (the gRPC door's rules), `local` calls the admin servicer
in-process, `live` samples the series and streams events (SSE), `routes` the endpoints.
"""
