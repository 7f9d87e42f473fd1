"""The OpenAI-compatible HTTP front end: ``rollout serve --http-port P``, beside gRPC, on the same engine.

``/v1/completions``, ``/v1/chat/completions`` (streamed as server-sent events or not), ``/v1/models``,
``/health`` and ``/metrics`` (Prometheus). It is a thin layer over the same ``EngineClient`` as the
gRPC servicer: requests are checked and converted at the edge (``to_engine``), answers are built in
``responses``, errors are OpenAI error objects carrying the gRPC status's name (``errors``).
"""
