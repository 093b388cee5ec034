"""The pieces of the project's one-page HTML reports (calibration/report.py, train/report.py): one style, a
key/value table, figures with captions, a warnings box. Standard library only; every text is escaped here.

A report is one self-contained page: the figures are PNG files beside it, referred to by name.
"""
from __future__ import annotations

import html
from typing import Iterable, Sequence, Tuple

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e0;border:1px solid #e0a040;padding:0.5em 1em}img{max-width:100%}
figure{margin:1.5em 0}figcaption{color:#444}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"""


def esc(text: object) -> str:
    return html.escape(str(text))


def page(title: str, body: str) -> str:
    """A whole page: `body` is HTML already (built with the helpers below)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{STYLE}</style></head>
<body>{body}
</body></html>
"""


def key_values(rows: Iterable[Tuple[str, str]]) -> str:
    """A two-column table: what, value."""
    body = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def grid(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table with a header row; cells after the first are numbers, right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<th>{esc(c)}</th>" if i == 0 else f'<td class="num">{esc(c)}</td>'
                                      for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def figures(items: Iterable[Tuple[str, str]]) -> str:
    """(file name beside the page, caption) -> figures; the caption is the alt text too."""
    return "\n".join(f'<figure><img src="{esc(name)}" alt="{esc(caption)}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>" for name, caption in items)


def warnings_box(warnings: Sequence[str]) -> str:
    """The warnings, in a box that stands out; nothing when there are none."""
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return f'<div class="warn"><h2>Warnings</h2><ul>{items}</ul></div>'
