"""How hier draws: in a font that has Hangul as well as Latin letters, and matplotlib with no display;
the HTML pages hier writes carry the glyphs they need (``hangul_css``).

Hecto's 396 classes and AI-hub's models are named in Korean; matplotlib's own DejaVu Sans has no Hangul
and draws every syllable as an empty box. NanumGothic (SIL Open Font License) comes with the
``koreanize-matplotlib`` dependency; only its font file is used (its module changes global settings on
import and imports ``distutils``, gone from Python 3.12). DejaVu Sans stays the fallback of each glyph
NanumGothic lacks. ``hangul_font`` alone touches nothing of matplotlib (``Prediction.plot`` draws with
PIL, in a notebook whose own backend stays as it is); ``pyplot`` sets up the figures hier writes to files.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import logging
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


HTML_FAMILY = "hier-hangul"   # the family first in the pages' font stacks, for Hangul alone (base_style.html)
HANGUL = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF))   # jamo, compat. jamo, syllables
HANGUL_RANGE = ", ".join(f"U+{a:04X}-{b:04X}" for a, b in HANGUL)    # as CSS unicode-range says it
CSS_MARK = "/* hier-hangul */"  # where a page template's <style> takes ``hangul_css``


def hangul_css(text: str) -> str:
    """An ``@font-face`` rule for an HTML page: NanumGothic cut to the Hangul of ``text`` and embedded, as
    the family ``HTML_FAMILY`` for Hangul alone (``HANGUL_RANGE``), first in the pages' font stacks: Hangul
    draws in it on every viewer, a server or a fresh container without a Korean font included (as a
    fallback after the system's fonts, Chromium still drew some cells as boxes); the rest of the page in
    the system's fonts. "" when ``text`` has no Hangul.

    Example:
        >>> html = page.replace(CSS_MARK, hangul_css(page), 1)
    """
    chars = "".join(sorted({c for c in text if any(a <= ord(c) <= b for a, b in HANGUL)}))
    if not chars:
        return ""
    data = base64.b64encode(_subset(text=chars)).decode("ascii")
    return (f'@font-face {{ font-family: "{HTML_FAMILY}"; unicode-range: {HANGUL_RANGE}; '
            f'src: url(data:font/ttf;base64,{data}) format("truetype"); }}')


@cache
def hangul_webfont() -> bytes:
    """NanumGothic's Hangul as a browser takes it, for the service's upload page: the file as shipped has
    zero-length hinting-source tables (``TSI*``) that Chromium's font sanitizer refuses whole."""
    return _subset(unicodes=[c for a, b in HANGUL for c in range(a, b + 1)])


def _subset(**chosen) -> bytes:
    """NanumGothic cut to ``chosen`` (``text=`` or ``unicodes=``, as fontTools' ``Subsetter.populate``)."""
    from fontTools import subset                 # matplotlib's dependency: only pages with Hangul need it
    logging.getLogger("fontTools.subset").setLevel(logging.ERROR)   # tables it drops, one line each
    options = subset.Options()
    font = subset.load_font(str(hangul_font()), options)
    subsetter = subset.Subsetter(options)
    subsetter.populate(**chosen)
    subsetter.subset(font)
    data = io.BytesIO()
    subset.save_font(font, data, options)
    return data.getvalue()
