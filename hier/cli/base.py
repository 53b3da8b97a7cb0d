"""What every command shares: the typer app, the consoles, the output formats and ``main``.

User mistakes raise HierError; ``main`` prints them as one red line and exits 2, never a traceback.
"""
from __future__ import annotations

import glob
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hier.errors import HierError, HierWarning

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Fine-grained car recognition: brand, model and year that never contradict.")
console = Console(width=None if sys.stdout.isatty() else 160)   # pipes and CI logs get whole rows
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from hier.version import __version__
        console.print(f"hier {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                   help="Print hier's version and exit")] = False) -> None:
    """Fine-grained car recognition: brand, model and year that never contradict."""


def expand_globs(paths: list[Path], flag: str) -> list[Path]:
    """Paths as given, a quoted pattern (``'shots/*.jpg'``, which no shell expanded) replaced by the files
    it matches, sorted; a pattern matching nothing is an error."""
    out = []
    for p in paths:
        if p.exists() or not any(ch in str(p) for ch in "*?["):
            out.append(p)
            continue
        found = sorted(glob.glob(str(p)))
        if not found:
            raise HierError(f"{flag} {p}: no file matches")
        out += map(Path, found)
    return out


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def print_metrics(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and v is not None:
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


def _encodable(text: str) -> bool:
    """Whether stdout's encoding (ASCII under ``LC_ALL=C``) can carry ``text`` as it is."""
    try:
        text.encode(sys.stdout.encoding or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def print_frame(frame, fmt: Format) -> None:
    """JSON and CSV stay lossless whatever the locale: JSON falls back to \\u escapes, CSV to UTF-8 bytes
    (the encoding of every file hier writes) when stdout's encoding cannot hold a class name."""
    if fmt is Format.json:
        text = frame.to_json(orient="records", force_ascii=False, indent=1)
        print(text if _encodable(text) else frame.to_json(orient="records", force_ascii=True, indent=1))
    elif fmt is Format.csv:
        text = frame.to_csv(index=False)
        if _encodable(text) or not hasattr(sys.stdout, "buffer"):
            sys.stdout.write(text)
        else:
            sys.stdout.flush()
            sys.stdout.buffer.write(text.encode("utf-8"))
            sys.stdout.buffer.flush()
    else:
        table = Table()
        for col in frame.columns:
            table.add_column(str(col))
        for row in frame.itertuples(index=False):
            table.add_row(*[f"{v:.3f}" if isinstance(v, float) else Path(v).name if col == "image" else str(v)
                            for col, v in zip(frame.columns, row)])
        console.print(table)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hier's own warnings as one yellow line; others as Python prints them."""
    if issubclass(category, HierWarning):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main() -> None:
    """Exit codes: 0 done, 2 a user error (one ``error:`` line), 130 interrupted (Ctrl-C), so
    ``hier train ... && hier predict ...`` never goes on after a failed or interrupted step.

    Printing never fails: under an ASCII locale (``LC_ALL=C``) a Korean class name in a table or an
    error line is written \\u-escaped (``errors="backslashreplace"``) instead of raising
    UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):     # a replaced stream without reconfigure
            pass
    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False, prog_name="hier")   # typer turns Ctrl-C into a returned 130
        if isinstance(code, int) and code:
            if code == 130:
                err.print("[red]interrupted[/]")
            sys.exit(code)
    except HierError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except (typer.Exit, SystemExit):
        raise
    except Exception as e:
        # usage errors (missing argument, bad option) from click or typer's vendored copy of it
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()
            else:
                err.print(f"[red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise
