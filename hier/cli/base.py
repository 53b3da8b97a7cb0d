"""What every command shares: the typer app, the consoles, the output formats and ``main``.

User mistakes raise HierError; ``main`` prints them as one red line and exits 2, never a traceback.
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hier.artifact import files
from hier.errors import HierError, HierWarning

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Fine-grained car recognition: brand, model and year that never contradict.")
console = Console(width=None if sys.stdout.isatty() else 160)   # pipes and CI logs get whole rows
err = Console(stderr=True)


class Command(typer.core.TyperCommand):
    """A command whose usage line leaves out its hidden arguments (``hier enroll``'s ``more``: the rest of
    ``--images a.jpg b.jpg``, which the user writes as ``--images``)."""

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not getattr(param, "hidden", False):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def one_line_helps(app: typer.Typer) -> None:
    """The command list shows each command's first docstring paragraph on one line (rich kept the
    docstring's line breaks there, so it wrapped mid-sentence)."""
    for command in app.registered_commands:
        if command.short_help is None and command.callback is not None and command.callback.__doc__:
            command.short_help = " ".join(inspect.getdoc(command.callback).split("\n\n")[0].split())
    for group in app.registered_groups:
        one_line_helps(group.typer_instance)


def _version(value: bool) -> None:
    if value:
        from hier.version import __version__
        console.print(f"hier {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                   help="Print hier's version and exit")] = False) -> None:
    """Fine-grained car recognition: brand, model and year that never contradict."""


def _is(path: Path, kind: str = "exists") -> bool:
    """``path.exists()`` (or ``is_dir``) whose OS error (a name too long, no permission) is one line."""
    try:
        return getattr(path, kind)()
    except OSError as e:
        shown = str(path) if len(str(path)) <= 120 else str(path)[:120] + "..."
        raise HierError(f"{shown}: {e.strerror or e}") from None


def path_of(text: str) -> Path:
    """A path argument as typed: an empty one is refused (``Path("")`` is the current folder, searched
    whole: an empty variable in a script indexed every photo below it)."""
    if not text.strip():
        raise typer.BadParameter("an empty path")
    return Path(text)


def expand_globs(paths: list[Path], flag: str) -> list[Path]:
    """Paths as given, a quoted pattern (``'shots/*.jpg'``, which no shell expanded; ``**`` any depth)
    replaced by the files it matches, sorted (its existing folders taken literally: ``'shots[1]/*.jpg'``);
    a path that does not exist, a dangling link or a pattern matching nothing is an error."""
    out = []
    for p in paths:
        if _is(p):
            out.append(p)
            continue
        if p.is_symlink():
            raise HierError(f"{flag} {p} is a symlink that leads nowhere (dangling or a loop): -> {os.readlink(p)}")
        if not any(ch in str(p) for ch in "*?["):
            raise HierError(f"{flag} {p}: not found")
        found = sorted(glob.glob(_literal_folders(p), recursive=True))     # 'deep/**/*.jpg' as a shell's globstar
        if not found:
            raise HierError(f"{flag} {p}: no file matches")
        out += map(Path, found)
    return out


def _literal_folders(pattern: Path) -> str:
    """``pattern`` with its longest existing leading folder escaped (``[`` in a folder's name is no class)."""
    parts = pattern.parts
    for i in range(len(parts) - 1, 0, -1):
        head = Path(*parts[:i])
        if _is(head, "is_dir"):
            return str(Path(glob.escape(str(head)), *parts[i:]))
    return str(pattern)


def _given(value) -> list[Path]:
    """The paths a parameter holds: one, several (a list) or none."""
    return [Path(p) for p in (value if isinstance(value, (list, tuple)) else [value]) if p is not None]


def _hier_folders(ctx: typer.Context, param: typer.CallbackParam, value):
    """Check ARTIFACT arguments as they are parsed, before any heavy import: a folder hier reads (its
    missing files named), not a path that is absent or a file (a photo where the artifact goes, as in
    ``hier enroll --images a.jpg b.jpg ART``)."""
    for path in _given(value):
        if not _is(path):
            raise HierError(f"artifact not found: {path}")
        if not _is(path, "is_dir"):
            raise HierError(f"{path} is a file, not an artifact folder" + (
                "" if param.param_type_name == "option" else
                f"; the artifact comes first: hier {ctx.command_path.removeprefix('hier ')} ARTIFACT ..."))
        lacks = files.missing(path)
        if lacks:
            raise HierError(f"{path} is not a hier artifact (missing {', '.join(lacks)})")
    return value


def artifact_argument(help: str = "Artifact directory"):
    """The ARTIFACT argument of a command, checked as it is parsed (``_hier_folders``)."""
    return typer.Argument(help=help, callback=_hier_folders, parser=path_of)


def artifact_option(help: str):
    """An ``--artifact`` option, checked as it is parsed (``_hier_folders``)."""
    return typer.Option(help=help, callback=_hier_folders, parser=path_of)


def _exists(noun: str | None):
    """A callback checking input paths as they are parsed, before any heavy import: each exists (else
    ``NOUN not found: PATH``, the option's flag for a noun by default)."""
    def check(ctx: typer.Context, param: typer.CallbackParam, value):
        for path in _given(value):
            if not _is(path):
                raise HierError(f"{noun or param.opts[0]} not found: {path}")
        return value
    return check


def input_argument(help: str, noun: str):
    """An input path argument (``noun``: what the error calls it), checked to exist as it is parsed."""
    return typer.Argument(help=help, callback=_exists(noun), parser=path_of)


def input_option(help: str, noun: str | None = None):
    """An input path option (``--test-csv``...), checked to exist as it is parsed."""
    return typer.Option(help=help, callback=_exists(noun), parser=path_of)


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


def print_frame(frame, fmt: Format, as_written: tuple[str, ...] = ()) -> None:
    """JSON and CSV stay lossless whatever the locale: JSON falls back to \\u escapes, CSV to UTF-8 bytes
    (the encoding of every file hier writes) when stdout's encoding cannot hold a class name. The table
    rounds hier's own numbers to 3 decimals, never the ``as_written`` columns (sellers' numbers)."""
    if fmt is Format.json:          # every digit and sign as Python holds it (pandas' to_json keeps 10 decimals)
        rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
        text = json.dumps(rows, ensure_ascii=False, indent=1, default=str)
        print(text if _encodable(text) else json.dumps(rows, ensure_ascii=True, indent=1, default=str))
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
            table.add_row(*[f"{v:.3f}" if isinstance(v, float) and col not in as_written else
                            Path(v).name if col == "image" else str(v) for col, v in zip(frame.columns, row)])
        console.print(table)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hier's own warnings as one yellow line; others as Python prints them."""
    if issubclass(category, HierWarning):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _one_line(message: str) -> str:
    """An error message on one line (a newline in a path given would split it)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


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
        err.print(f"[red]error:[/] {escape(_one_line(str(e)))}", highlight=False, soft_wrap=True)
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
                err.print(f"[red]error:[/] {escape(_one_line(e.format_message()))}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise
