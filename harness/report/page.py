"""The report page: parts collected in three places, rendered as Markdown and as one self-contained HTML file.

The page reads top to bottom: the **summary** (what was run, on what machine, under what load, and the
findings), then the **figures**, then the detailed **tables**. Sections add their parts to whichever
place they belong, in any order.

Tables are rendered here, not with ``DataFrame.to_html``/``to_markdown`` (whose index name makes a second
header row): one header row, text columns left-aligned, numeric columns right-aligned, the same in both.

Owns: the page's markup. Imports: :mod:`harness.display` (table cells, the Markdown table).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd

from harness.display import markdown_table, table_rows

PLACES = ("summary", "figures", "tables")
CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px}th{background:#f2f2f2}
.l{text-align:left}.r{text-align:right}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}ul.findings li{margin:.3em 0}
"""
def html_table(df: pd.DataFrame | None, index: bool = True) -> str:
    """The same table as HTML: one ``<thead>`` row, a class per cell for its column's alignment."""
    if df is None or df.empty:
        return "<p><em>no data</em></p>"
    header, rows, align = table_rows(df, index)
    head = "".join(f"<th class='{a}'>{html.escape(h)}</th>" for h, a in zip(header, align))
    body = "".join("<tr>" + "".join(f"<td class='{a}'>{html.escape(v)}</td>" for v, a in zip(row, align)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Page:
    """Collects parts in :data:`PLACES` and renders them as Markdown and as self-contained HTML."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: dict[str, list[tuple[str, Any]]] = {place: [] for place in PLACES}

    def _add(self, place: str, kind: str, value: Any) -> None:
        self.parts[place].append((kind, value))

    def heading(self, text: str, place: str = "tables", level: int = 3) -> None:
        self._add(place, f"h{level}", text)

    def note(self, text: str, place: str = "tables") -> None:
        self._add(place, "p", text)

    def bullets(self, items: list[str], place: str = "summary") -> None:
        self._add(place, "ul", list(items))

    def table(self, df: pd.DataFrame, index: bool = True, place: str = "tables") -> None:
        self._add(place, "table", (df, index))

    def image(self, path: Path, alt: str, place: str = "figures") -> None:
        self._add(place, "img", (path, alt))

    def _ordered(self) -> list[tuple[str, Any]]:
        titles = {"summary": "Summary", "figures": "Figures", "tables": "Detailed tables"}
        out = []
        for place in PLACES:
            if self.parts[place]:
                out += [("h2", titles[place]), *self.parts[place]]
        return out

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self._ordered():
            if kind.startswith("h"):
                out += [f"{'#' * int(kind[1])} {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "ul":
                out += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                out += [markdown_table(*value), ""]
            else:
                out += [f"![{value[1]}]({value[0].name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
               f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self._ordered():
            if kind.startswith("h"):
                out.append(f"<{kind}>{html.escape(value)}</{kind}>")
            elif kind == "p":
                out.append(f"<p class='note'>{html.escape(value)}</p>")
            elif kind == "ul":
                out.append("<ul class='findings'>" + "".join(f"<li>{html.escape(v)}</li>" for v in value) + "</ul>")
            elif kind == "table":
                out.append(html_table(*value))
            else:
                data = base64.b64encode(value[0].read_bytes()).decode("ascii")
                out.append(f"<p><img alt='{html.escape(value[1])}' src='data:image/png;base64,{data}'></p>")
        out.append("</body></html>")
        return "\n".join(out)
