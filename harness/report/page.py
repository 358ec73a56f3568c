"""The report page: sections collected once, rendered as Markdown and as one self-contained HTML file.

Owns: the page's markup. Imports: :mod:`harness.display` (Markdown tables, the missing-cell mark).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd

from harness.display import MISSING, markdown_table

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}
"""


class Page:
    """Collects sections once and renders them as Markdown and as self-contained HTML."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self.parts.append(("h2", text))

    def note(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, df: pd.DataFrame, index: bool = True) -> None:
        self.parts.append(("table", (df, index)))

    def image(self, path: Path, alt: str) -> None:
        self.parts.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.parts:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "table":
                out += [markdown_table(*value), ""]
            else:
                out += [f"![{value[1]}]({value[0].name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
               f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.parts:
            if kind == "h2":
                out.append(f"<h2>{html.escape(value)}</h2>")
            elif kind == "p":
                out.append(f"<p class='note'>{html.escape(value)}</p>")
            elif kind == "table":
                df, index = value
                out.append("<p><em>no data</em></p>" if df is None or df.empty
                           else df.to_html(index=index, escape=True, border=0, na_rep=MISSING))
            else:
                data = base64.b64encode(value[0].read_bytes()).decode("ascii")
                out.append(f"<p><img alt='{html.escape(value[1])}' src='data:image/png;base64,{data}'></p>")
        out.append("</body></html>")
        return "\n".join(out)
