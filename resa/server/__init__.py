"""`resa serve`: an OpenAI-compatible HTTP server over the continuous batcher (docs/server.md).

`create_app(engine, ServerSettings(...))` gives the ASGI app (FastAPI); `resa.commands.serve`
runs it with uvicorn. Needs the `serve` extra (fastapi, uvicorn, pydantic, prometheus-client).
"""

from .app import ApiError, ServerSettings, create_app

__all__ = ["ApiError", "ServerSettings", "create_app"]
