"""The HTTP server (`deit serve`): the batching queue, the routes, the contracts.

    queue.py     BatchQueue: submit items, get futures; one worker runs them in batches
    schemas.py   request parsing (Azure /score, Open Inference Protocol v2), ServeError
    urls.py      URL inputs: allow-list, address filter, pinned connections, limits
    metrics.py   the Prometheus metrics
    service.py   Settings and the Service the routes share (model, queues, threads, warm-up)
    routes.py    HTTP <-> engine, and the one map from errors to statuses
    app.py       create_app: the routes, the API-key and metrics middleware, the lifespan
    server.py    uvicorn: the listening socket, start-up, graceful draining

Needs the `serve` extra (starlette, uvicorn, prometheus_client). The model computations
live in deit_cli.engine.serve (ServedModel); this package never touches tensors.
"""
