"""The HTTP gateway, a Ray Serve ingress deployment (docs/gateway.md): its own process.

    app.py       the FastAPI app, its routes, and the Serve shell (`build_app`)
    broker.py    what the routes do against Redis, through the SDK
    http.py      the one error shape, API keys, the body limit
    bodies.py    request and response bodies (the OpenAPI document)

A Serve config names `sluice.gateway:build_app`; without Serve, any ASGI server runs
`sluice.gateway:from_env` (`uvicorn --factory`).
"""

from sluice.gateway.app import Gateway, build_app, create_app, from_env

__all__ = ["Gateway", "build_app", "create_app", "from_env"]
