"""HTML building blocks of the report: the page's style sheet, escaping, tables, cells, embedded figures.

Knows HTML, not results: :mod:`hrsa.analyze.report.sections` puts the results into these blocks. Every text is
escaped unless it is an :class:`Html` (built and escaped here already).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hrsa.analyze.report.figures import png_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CSS",
    "Html",
    "MutedNumberCell",
    "NumberCell",
    "VerdictCell",
    "compact",
    "escape",
    "figure",
    "hidden_states",
    "number",
    "table",
]

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d232b;
       background: #f6f7f9; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 21px; margin-top: 40px; padding-top: 12px;
   border-top: 3px solid #3b6ea8; } h3 { font-size: 17px; margin: 26px 0 8px; color: #2c4f78; }
p.meta, p.note, figcaption { color: #5b6470; font-size: 13px; }
p.warning { color: #8a4b00; background: #fff4e0; border-left: 3px solid #d98a00; padding: 4px 8px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid #d5dae1; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f7; } tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, Menlo, Consolas, monospace; }
td.preserved { background: #dcf2e0 !important; color: #17602b; font-weight: 600; }
td.restructured { background: #fde8cf !important; color: #8a4a00; font-weight: 600; }
td.not-measured { color: #7a828c; }
td.no-signal { color: #7a828c; font-style: italic; }
td.within-null { color: #a3aab2; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 4px 0; flex: 0 1 560px; max-width: 100%; }
figure.wide { flex: 1 1 100%; }
figure img { width: 100%; height: auto; border: 1px solid #e3e6ea; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; font-size: 13.5px; }
dl.prov dt { color: #5b6470; } dl.prov dd { margin: 0; word-break: break-all; }
nav ul { padding-left: 20px; } code { font-size: 12.5px; }
"""

EMBED_DPI = 100  # the report's images are scaled to its columns; 100 dpi keeps the page small


class Html(str):
    """HTML already built (and escaped): :func:`table` inserts it as is."""


class NumberCell(str):
    """A formatted number: its table cell is right-aligned."""


class MutedNumberCell(NumberCell):
    """A number shown greyed out: a score no larger than tokens shuffled between the models give."""


class VerdictCell(str):
    """A verdict ("preserved", "restructured", "not measured", "no signal"): its table cell is coloured by it."""


def escape(value: Any) -> str:
    """``value`` as text, with ``<``, ``>``, ``&`` and quotes escaped."""
    return html.escape(str(value), quote=True)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, spans: Mapping[str, int] | None = None) -> str:
    """An HTML table; :class:`NumberCell` right-aligned, :class:`VerdictCell` coloured; None cells are covered by a
    rowspan.

    Args:
        header: the column titles.
        rows: the cells, row by row (text is escaped, :class:`Html` inserted as is).
        spans: the rowspan of a row's first two cells, keyed by the first cell's text.
    """
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        span = (spans or {}).get(str(row[0]), 1) if row and row[0] is not None else 1
        cells = []
        for j, cell in enumerate(row):
            if cell is None:
                continue
            attrs = f' rowspan="{span}"' if span > 1 and j < 2 else ""
            if isinstance(cell, VerdictCell):
                attrs += f' class="{cell.replace(" ", "-")}"'
            elif isinstance(cell, MutedNumberCell):
                attrs += ' class="num within-null"'
            elif isinstance(cell, NumberCell):
                attrs += ' class="num"'
            cells.append(f"<td{attrs}>{cell if isinstance(cell, Html) else escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def number(value: Any) -> NumberCell:
    """3 decimals; integers as they are; None or NaN (an undefined metric) as "n/a"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NumberCell("n/a")
    if isinstance(value, int) and not isinstance(value, bool):
        return NumberCell(str(value))
    text = f"{float(value):.3f}"
    return NumberCell("0.000" if text == "-0.000" else text)


def figure(fig: Figure, caption: str, *, wide: bool = False) -> Html:
    """A matplotlib figure as an embedded PNG (base64 data URI) with its caption; ``wide`` takes the page's width."""
    data = base64.b64encode(png_bytes(fig, dpi=EMBED_DPI)).decode("ascii")
    cls = ' class="wide"' if wide else ""
    return Html(f'<figure{cls}><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
                f"<figcaption>{escape(caption)}</figcaption></figure>")


def hidden_states(states: Sequence[int] | None) -> str:
    """A list of hidden states in few characters: a run ``0-28``, else the indices."""
    s = list(states or [])
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s)) or "none"


def compact(value: Any) -> str | None:
    """A settings mapping as ``key=value, ...`` (unset and False left out); None stays None."""
    if not isinstance(value, Mapping):
        return None if value is None else str(value)
    return ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, False)) or "all tokens"
