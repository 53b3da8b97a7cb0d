"""hier: fine-grained car recognition with a brand -> model -> fine-class hierarchy that never contradicts."""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # no version check over the network at import

from hier.errors import HierError  # noqa: E402
from hier.taxonomy import Taxonomy  # noqa: E402
from hier.version import __version__  # noqa: E402

__all__ = ["HierError", "Recognizer", "Results", "Taxonomy", "__version__"]


def __getattr__(name: str):
    """``from hier import Recognizer`` without importing torch for ``import hier`` (the CLI starts faster)."""
    if name == "Recognizer":
        from hier.recognizer import Recognizer
        return Recognizer
    if name in ("Results", "Prediction"):
        from hier import results
        return getattr(results, name)
    raise AttributeError(f"module 'hier' has no attribute {name!r}")
