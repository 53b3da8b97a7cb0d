"""One exception type for user-facing problems (the CLI prints its message on one line and exits 2),
and the number check every flag, form field and API argument goes through."""
from __future__ import annotations

import math


class HierError(Exception):
    """Bad input or state the user can fix (missing folder, unknown class, wrong CSV...)."""


class ArtifactGone(HierError):
    """The artifact being served is no longer on disk (moved, being replaced): a state to wait out, not a
    client's mistake (the service answers 503)."""


class NotFound(HierError):
    """A name the user gave is not there (an enrolled class to remove): the service answers 404."""


class HierWarning(UserWarning):
    """Something the user should know once (an older artifact's missing parts); the CLI prints it as one
    ``warning:`` line. Python shows each distinct message once per process."""


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 integer: bool = False):
    """``value`` if it is a finite number in [low, high] (a whole one with ``integer``), else HierError.

    ``nan`` and ``inf`` pass most range checks (every comparison with nan is false), and one of them in
    a score offset or a temperature poisons every later answer, so each number a user gives is checked
    here before any work."""
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if ok and integer:
        ok = float(value) == int(value)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        span = (f" from {low:g} to {high:g}" if low is not None and high is not None else
                f" of at least {low:g}" if low is not None else f" of at most {high:g}" if high is not None else "")
        raise HierError(f"{name} must be {kind}{span}, not {value}")
    return int(value) if integer else value
