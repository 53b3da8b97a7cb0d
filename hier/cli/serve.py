"""``hier serve``: the HTTP service over one artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hier.cli.base import app, err
from hier.errors import HierError


@app.command()
def serve(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory")],
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted photo")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="Concurrent photos answered in one forward pass")] = 16,
):
    """HTTP API (/predict, /similar, /enroll, /health, /docs) and an upload page at /. /enroll needs
    the header X-Admin-Token equal to the HIER_ADMIN_TOKEN environment variable."""
    import socket

    import uvicorn

    from hier.recognizer import Recognizer
    from hier.serve import create_app

    rec = Recognizer(artifact)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise HierError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    err.print(f"serving {artifact} on http://{host}:{port} (API docs at /docs)")
    uvicorn.run(create_app(artifact, max_upload_mb, max_batch, recognizer=rec), host=host, port=port,
                log_level="warning")
