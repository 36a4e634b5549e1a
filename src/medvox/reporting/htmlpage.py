"""Building blocks of medvox's self-contained HTML pages (the run report and the model comparison).

Every helper returns :class:`Html`, a ``str`` that is already safe markup; anything else that ends up in
a page goes through :func:`esc` (``html.escape`` with quotes), so a case id or a config value can never
inject markup. Images are embedded as ``data:image/png;base64`` URIs, and a Content-Security-Policy
forbids every external load, so a page that renders once renders the same offline, anywhere.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# no network, no script: only inline styles and data: images
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;
 background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:0 0 6px}h2{font-size:21px;border-bottom:2px solid #dfe3ea;padding-bottom:4px;margin-top:38px}
h3{font-size:17px;margin:22px 0 8px}
nav{margin:10px 0 18px;font-size:14px}nav a{margin-right:14px;color:#2454a6;text-decoration:none}
.wrap{overflow-x:auto;margin:8px 0 14px}
table{border-collapse:collapse;font-size:13.5px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dfe3ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600}tr:nth-child(even) td{background:#fafbfc}
td table{font-size:12.5px}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;margin:10px 0;font-size:14px}
.warn{background:#fdecea;border-left:4px solid #d93025;padding:8px 12px;margin:10px 0;font-size:14px}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #e3e6eb}
figcaption{font-size:13px;color:#555;margin-top:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.grid.wide{grid-template-columns:repeat(auto-fill,minmax(520px,1fr))}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}
.meta{color:#666;font-size:13px}
"""


class Html(str):
    """A string of markup that is already safe (built by these helpers)."""


def esc(value: Any) -> str:
    """HTML-escape any value's text (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """Plain text of a value: floats with ``digits`` decimals, ``None``/NaN as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}" if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) or v is None for v in value):
        return ", ".join(fmt(v, digits) for v in value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def exact(value: Any) -> str:
    """Plain text of a setting: floats in their shortest exact form (0.9999 stays 0.9999)."""
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) or v is None for v in value):
        return ", ".join(exact(v) for v in value)
    return fmt(value)


def _cell(value: Any, formatter=fmt) -> str:
    return value if isinstance(value, Html) else esc(value if isinstance(value, str) else formatter(value))


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], formatter=fmt) -> Html:
    """A table; cells that are not :class:`Html` are formatted (:func:`fmt` by default) and escaped."""
    head = "".join(f"<th>{_cell(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c, formatter)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')


def kv_table(mapping: dict[str, Any], formatter=exact) -> Html:
    """Key/value table of settings (exact values); nested dicts become nested tables."""
    rows = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            rows.append([key, kv_table(value, formatter)])
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows.append([key, Html("".join(kv_table(v, formatter) for v in value))])
        else:
            rows.append([key, value])
    return table(["key", "value"], rows, formatter)


def para(text: str) -> Html:
    return Html(f"<p>{esc(text)}</p>")


def h3(text: str) -> Html:
    return Html(f"<h3>{esc(text)}</h3>")


def note(text: str, warn: bool = False) -> Html:
    """A highlighted remark (a missing piece, an approximation); ``warn`` for something to act on."""
    return Html(f'<div class="{"warn" if warn else "note"}">{esc(text)}</div>')


def notes(items: Sequence[str], warn: bool = False) -> Html:
    if not items:
        return Html("")
    lis = "".join(f"<li>{esc(t)}</li>" for t in items)
    return Html(f'<div class="{"warn" if warn else "note"}"><ul style="margin:0;padding-left:18px">{lis}</ul></div>')


def details(summary: str, inner: str, open_: bool = False) -> Html:
    """A collapsible block; ``inner`` must be :class:`Html`."""
    return Html(f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{inner}</details>")


def figure(png: bytes | None, caption: str) -> Html:
    """An embedded PNG with a caption; ``None`` or bytes that are not a PNG become a note."""
    if png is None:
        return note(caption)
    if not png.startswith(_PNG_MAGIC):
        return note(f"{caption}: not a PNG image, left out")
    data = base64.b64encode(png).decode("ascii")
    return Html(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>")


def figure_of(path: Path | None, caption: str) -> Html:
    """:func:`figure` of a PNG file (a note when the file is missing)."""
    if path is None or not Path(path).is_file():
        return note(f"{caption}: image missing")
    return figure(Path(path).read_bytes(), caption)


def grid(items: Sequence[str], wide: bool = False) -> Html:
    """Figures side by side (``wide``: at most two per row, for the big learning-curve grids)."""
    return Html(f'<div class="grid{" wide" if wide else ""}">' + "".join(f"<div>{i}</div>" for i in items) + "</div>")


def page(title: str, intro: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: title, table of contents, ``intro`` markup and ``(id, heading, markup)`` sections."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(head)}</a>' for sid, head, _ in sections)
    body = "".join(f'<section id="{esc(sid)}"><h2>{esc(head)}</h2>{markup}</section>'
                   for sid, head, markup in sections)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body><main>"
        f'<h1>{esc(title)}</h1><div class="meta">generated {esc(stamp)} by medvox</div>'
        f"<nav>{nav}</nav>{intro}{body}</main></body></html>\n"
    )
