"""``hier serve``: the HTTP API and upload page over one ``Recognizer`` (FastAPI + uvicorn)."""
from hier.serve.app import create_app
from hier.serve.batching import MicroBatcher
from hier.serve.limits import ADMIN_TOKEN_ENV

__all__ = ["ADMIN_TOKEN_ENV", "MicroBatcher", "create_app"]
