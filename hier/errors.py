"""One exception type for user-facing problems: the CLI prints its message on one line and exits 2."""


class HierError(Exception):
    """Bad input or state the user can fix (missing folder, unknown class, wrong CSV...)."""
