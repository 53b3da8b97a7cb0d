"""``hier serve``: the HTTP API and upload page over one ``Recognizer`` (FastAPI + uvicorn)."""
from hier.serve.app import ADMIN_TOKEN_ENV, MicroBatcher, create_app

__all__ = ["ADMIN_TOKEN_ENV", "MicroBatcher", "create_app"]
