"""The HTTP server (`deit serve`): the batching queue, the routes, the contracts.

    queue.py     BatchQueue: submit items, get futures; one worker runs them in batches
    schemas.py   request parsing (Azure /score, Open Inference Protocol v2), ServeError
    urls.py      URL inputs: allow-list, address filter, pinned connections, limits
    metrics.py   the Prometheus metrics
    app.py       Settings, the shared Service, API-key middleware, create_app
    routes.py    HTTP <-> engine, nothing else

Needs the `serve` extra (starlette, uvicorn, prometheus_client). The model computations
live in deit_cli.engine.serve (ServedModel); this package never touches tensors.
"""
