"""How hier draws: in a font that has Hangul as well as Latin letters, and matplotlib with no display.

Hecto's 396 classes and AI-hub's models are named in Korean; matplotlib's own DejaVu Sans has no Hangul
and draws every syllable as an empty box. NanumGothic (SIL Open Font License) comes with the
``koreanize-matplotlib`` dependency; only its font file is used (its module changes global settings on
import and imports ``distutils``, gone from Python 3.12). DejaVu Sans stays the fallback of each glyph
NanumGothic lacks. ``hangul_font`` alone touches nothing of matplotlib (``Prediction.plot`` draws with
PIL, in a notebook whose own backend stays as it is); ``pyplot`` sets up the figures hier writes to files.
"""
from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from hier.errors import HierError

FAMILY = "NanumGothic"


@cache
def hangul_font() -> Path:
    """The NanumGothic file of the ``koreanize-matplotlib`` package (found without importing it)."""
    spec = importlib.util.find_spec("koreanize_matplotlib")
    path = Path(next(iter(spec.submodule_search_locations))) / "fonts" / "NanumGothic.ttf" if spec else None
    if path is None or not path.is_file():
        raise HierError("the Hangul font is missing: pip install koreanize-matplotlib (a dependency of hier)")
    return path


@cache
def pyplot():
    """``matplotlib.pyplot`` drawing to files (the Agg backend), its font set once to NanumGothic with
    DejaVu Sans behind it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    font_manager.fontManager.addfont(str(hangul_font()))
    matplotlib.rcParams["font.family"] = [FAMILY, "DejaVu Sans"]
    matplotlib.rcParams["axes.unicode_minus"] = False       # NanumGothic has no U+2212 minus
    return plt
