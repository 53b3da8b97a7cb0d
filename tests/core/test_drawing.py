"""Every picture hier draws renders Korean class names: a font with Hangul, no empty boxes."""
import io
import re
import warnings
from pathlib import Path

import matplotlib
from matplotlib.ft2font import FT2Font

from hier import drawing
from hier.drawing import hangul_font, pyplot

NAMES = "1시리즈_F20_2013_2015 · 그랜저_GN7_2023 · 신형모델_2025"


def _draw(text: str) -> list[str]:
    """Warnings matplotlib gives while drawing ``text`` (a missing glyph is one)."""
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.set_title(text)
    ax.set_xticks([0, 1], [text, "-1"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
    return [str(w.message) for w in seen]


def test_korean_class_names_draw_with_every_glyph():
    assert _draw(NAMES) == []
    hangul = {ord(ch) for ch in NAMES if "\uac00" <= ch <= "\ud7a3"}
    assert hangul <= set(FT2Font(str(hangul_font())).get_charmap())     # the PIL contact sheet's font too


def test_the_check_fails_in_a_font_without_hangul():
    pyplot()
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}):
        assert any("missing from font" in w for w in _draw(NAMES))


def test_no_module_but_hier_drawing_sets_up_matplotlib():
    """One place chooses the backend and the font: a module importing pyplot itself would draw boxes."""
    hier = Path(drawing.__file__).parent
    own = [p.relative_to(hier).as_posix() for p in hier.rglob("*.py")
           if re.search(r"import matplotlib\.pyplot|matplotlib\.use\(|pyplot as plt", p.read_text(encoding="utf-8"))]
    assert own == ["drawing.py"]


def test_html_pages_carry_the_hangul_they_show():
    """The report, audit and upload pages named system fonts only: on a server or a fresh container
    without a Korean font every syllable was an empty box. A page embeds NanumGothic cut to its own
    characters (a few KB), as a family its font stack names after the system's."""
    import base64

    from fontTools.ttLib import TTFont
    assert drawing.hangul_css("plain ASCII page <b>x</b>, é, 宝马 5系") == ""         # no Hangul: nothing embedded
    css = drawing.hangul_css(f"<p>{NAMES}</p>")
    assert css.startswith(f'@font-face {{ font-family: "{drawing.HTML_FAMILY}"; unicode-range: {drawing.HANGUL_RANGE}; '
                          'src: url(data:font/ttf;base64,')
    font = TTFont(io.BytesIO(base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", css).group(1))))
    cmap = font.getBestCmap()
    assert all(ord(c) in cmap for c in NAMES if "\uac00" <= c <= "\ud7a3")   # every syllable shown has its glyph
    assert ord("현") not in cmap and len(css) < 40_000                    # and only those: small
    style = (Path(drawing.__file__).parent / "report" / "base_style.html").read_text(encoding="utf-8")
    assert drawing.CSS_MARK in style and f'font: 14px/1.45 "{drawing.HTML_FAMILY}", system-ui' in style   # first
