"""``hier serve``: the HTTP service over one artifact."""
from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from hier.cli.base import app, artifact_argument, err
from hier.errors import HierError, check_number


def check_listen(host: str, port: int) -> None:
    """Refuse a host or port the server could not listen on, before the model is read. SO_REUSEADDR,
    as uvicorn sets it: a port whose last server just stopped (its connections still in TIME_WAIT) is
    free to listen on again, only a port another server listens on is refused."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, ValueError) as e:          # in use, no such interface, a host that is no name
        raise HierError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None


def _json_lines_to_stderr(logger: str) -> None:
    """The service's JSON log lines (``hier.access``: one a request; ``hier.audit``: one an enrollment
    change) on stderr, as they are, at INFO (Python's default WARNING level dropped them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(logger)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@app.command()
def serve(
    artifact: Annotated[Path, artifact_argument()],
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted photo")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="Concurrent photos answered in one forward pass")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 503")] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds a request may wait for its answer; then 503")] = 30.0,
    max_enroll_files: Annotated[int, typer.Option(help="Photos one /enroll request may carry")] = 64,
    access_log: Annotated[bool, typer.Option(help="One JSON line per request on stderr")] = True,
    max_connections: Annotated[int, typer.Option(help="Connections and requests at once; more get 503")] = 256,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request's body may take to arrive (and from 5 s "
                                                "on at least 16 KB/s); then 408")] = 60.0,
):
    """HTTP API (/predict, /similar, /enroll, /health/live, /health/ready, /metrics, /docs) and an
    upload page at /. /enroll needs the header X-Admin-Token equal to the HIER_ADMIN_TOKEN environment
    variable."""
    if not host.strip():                # "" listens on every interface: say 0.0.0.0 if that is meant
        raise HierError("--host is empty; give an interface (127.0.0.1, or 0.0.0.0 for every one)")
    check_number("--port", port, 1, 65535, integer=True)          # before the heavy imports
    check_number("--max-connections", max_connections, 1, 100_000, integer=True)
    check_listen(host, port)
    import uvicorn

    from hier.serve import create_app
    from hier.serve.server import server_config

    service = create_app(artifact, max_upload_mb, max_batch, max_queue=max_queue, timeout_s=timeout,
                         max_enroll_files=max_enroll_files, body_timeout_s=body_timeout)   # the flags and the folder
    err.print(f"loading {artifact} ...")             # read and warmed before the first request: seconds
    for name in ("hier.audit", "hier.access") if access_log else ("hier.audit",):
        _json_lines_to_stderr(name)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"      # an IPv6 address in brackets
    err.print(f"serving {artifact} on {url} (API docs at {url}/docs)")
    # accepted requests are answered within --timeout, and a stalled upload 408 within --body-timeout, so a
    # stop waits that long for them (answered, not cancelled), no longer
    uvicorn.Server(server_config(service, host, port, max_connections=max_connections,
                                 graceful_s=int(max(timeout, body_timeout)) + 5)).run()
