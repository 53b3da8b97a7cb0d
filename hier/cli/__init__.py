"""``hier`` command line (typer + rich): one module per command group, each a thin layer over
``Recognizer``; ``main`` (in ``base``) turns user errors into one ``error:`` line and exit code 2."""
from hier.cli import audit, embed, enroll, ensemble, index, predict, report, serve, train  # noqa: F401  (registers the commands)
from hier.cli.base import app, main, one_line_helps

one_line_helps(app)

__all__ = ["app", "main"]
