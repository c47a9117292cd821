"""One self-contained HTML page from figures and tables: figures inlined as PNG (base64), so the page
is a single file that opens offline, can be mailed or attached, and needs no server."""

import base64
import html
import io
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top} th{background:#f4f4f4} tr.WARN td{background:#fff3e0} tr.ERROR td{background:#fde0e0}
figure{margin:1em 0} figcaption{color:#555;font-size:.9em} img{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em} .muted{color:#777}"""


def figure_html(fig: Figure, caption: str, dpi: int = 100) -> str:
    """The figure as an inline PNG with its caption (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], row_classes: Sequence[str] = ()) -> str:
    """A table; cells are escaped; `row_classes` (optional, one per row) become each <tr>'s class."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{html.escape(row_classes[i])}"' if i < len(row_classes) else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>"


def page(title: str, intro: str, sections: Sequence[tuple[str, str]]) -> str:
    """The page: a title, an intro line, a table of contents, then each (heading, html) section."""
    toc = " · ".join(f'<a href="#s{i}">{html.escape(h)}</a>' for i, (h, _) in enumerate(sections))
    body = "\n".join(f'<h2 id="s{i}">{html.escape(h)}</h2>\n{content}' for i, (h, content) in enumerate(sections))
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            f'<p class="muted">{html.escape(intro)}</p><p>{toc}</p>\n{body}\n</body></html>\n')
