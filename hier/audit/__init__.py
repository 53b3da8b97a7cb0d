"""``hier audit``: what is wrong with a labelled dataset, found before a model learns it (``run.audit``)."""
from hier.audit.run import audit

__all__ = ["audit"]
