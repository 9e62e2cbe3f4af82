"""Human-readable views of traces and mining reports: rich renderables for the terminal, standalone HTML."""

from __future__ import annotations

import html
import json
from typing import Any

_STYLES = ("bold black on yellow", "bold black on bright_cyan", "bold black on bright_green")
_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;line-height:1.5;color:#222}
.text{white-space:pre-wrap;border:1px solid #ddd;padding:1rem;border-radius:6px;background:#fafafa}
mark{background:#ffe066;border-radius:3px;padding:0 1px}
mark.high{background:#ffd43b}mark.medium{background:#ffe8a1}mark.low{background:#fff3cf}
table{border-collapse:collapse;width:100%;margin:1rem 0}td,th{border-bottom:1px solid #eee;padding:.3rem;
text-align:left;vertical-align:top}.ctx{color:#666}.ctx b{color:#000;background:#ffe066}
.meta{color:#888;font-size:.9em}
"""


def _page(title: str, body: str, data: Any) -> str:
    blob = html.escape(json.dumps(data, default=str))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        f"<script type='application/json' id='sourcetrace-data'>{blob}</script></body></html>"
    )


def _doc_label(occ: Any) -> str:
    title = occ.meta.get("title") if isinstance(occ.meta, dict) else None
    url = occ.meta.get("url") if isinstance(occ.meta, dict) else None
    label = html.escape(str(occ.doc_id)) + (f" — {html.escape(str(title))}" if title else "")
    if url:
        label = f"<a href='{html.escape(str(url))}'>{label}</a>"
    return label


# ---------------------------------------------------------------------- traces


def trace_html(result: Any, title: str = "sourcetrace: verbatim trace") -> str:
    """The traced text with merged spans highlighted (brightness by BM25), then each span's documents."""
    docs = {d["doc_index"]: d for d in result.documents()}
    level = {}
    for i, s in enumerate(result.spans):
        rel = [docs[o.doc_index].get("relevance", "low") for o in s.docs if o.doc_index in docs]
        level[i] = "high" if "high" in rel else "medium" if "medium" in rel else "low"
    out, pos = [], 0
    for m in result.merged:
        out.append(html.escape("".join(result.pieces[pos : m["start"]])))
        lv = max((level[i] for i in m["spans"]), key=["low", "medium", "high"].index)
        titles = "; ".join(f"span {i}: {result.spans[i].count} occurrences" for i in m["spans"])
        out.append(
            f"<mark class='{lv}' title='{html.escape(titles)}'>"
            f"{html.escape(''.join(result.pieces[m['start'] : m['end']]))}</mark>"
        )
        pos = m["end"]
    out.append(html.escape("".join(result.pieces[pos:])))
    body = ""
    if result.prompt:
        body += f"<h2>Prompt</h2><div class='text'>{html.escape(result.prompt)}</div>"
    body += (
        f"<h2>Response</h2><div class='text'>{''.join(out)}</div>"
        f"<p class='meta'>{len(result.spans)} spans kept of {result.n_candidates} maximal spans; "
        f"{len(docs)} documents; settings {html.escape(json.dumps(result.settings))}</p>"
    )
    rows = []
    for i, s in enumerate(result.spans):
        for o in s.docs:
            rows.append(
                f"<tr><td>{i}</td><td>{html.escape(s.text)}</td><td>{s.count}</td><td>{_doc_label(o)}</td>"
                f"<td>{(o.bm25 or 0):.2f}</td><td class='ctx'>…{html.escape(o.before)}<b>"
                f"{html.escape(o.match)}</b>{html.escape(o.after)}…</td></tr>"
            )
    body += (
        "<h2>Spans and documents</h2><table><tr><th>#</th><th>span</th><th>count</th><th>document</th>"
        "<th>BM25</th><th>context</th></tr>" + "".join(rows) + "</table>"
    )
    return _page(title, body, result.to_dict())


def trace_renderable(result: Any) -> Any:
    """A rich Group: the text with spans highlighted, then a table of spans and their best documents."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    text = Text()
    pos = 0
    for k, m in enumerate(result.merged):
        text.append("".join(result.pieces[pos : m["start"]]))
        text.append("".join(result.pieces[m["start"] : m["end"]]), style=_STYLES[k % len(_STYLES)])
        pos = m["end"]
    text.append("".join(result.pieces[pos:]))
    table = Table(
        title=f"{len(result.spans)} spans ({result.n_candidates} maximal) in "
        f"{len(result.documents())} documents",
        expand=True,
    )
    for col in ("#", "span", "count", "best documents"):
        table.add_column(col, overflow="fold")
    for i, s in enumerate(result.spans):
        docs = ", ".join(
            f"{o.doc_id}" + (f" ({o.bm25:.1f})" if o.bm25 is not None else "") for o in s.docs[:3]
        )
        table.add_row(str(i), s.text.strip(), str(s.count), docs + (" …" if len(s.docs) > 3 else ""))
    return Group(text, table)


# ---------------------------------------------------------------------- mining


def mining_html(report: Any, title: str = "sourcetrace: low-perplexity spans") -> str:
    """Each sample with its low-perplexity spans highlighted, then the span table and the summary."""
    parts = []
    by_sample: dict[int, list[Any]] = {}
    for s in report.spans:
        by_sample.setdefault(s.sample, []).append(s)
    for k, smp in enumerate(report.samples):
        parts.append(f"<h3>Sample {k}</h3>")
        if smp.prompt:
            parts.append(f"<p class='meta'>prompt: {html.escape(smp.prompt)}</p>")
        spans = sorted(by_sample.get(k, []), key=lambda s: s.start)
        pieces = [html.escape(s.text) for s in spans]
        parts.append("<div class='text'>" + html.escape(smp.text) + "</div>")
        if pieces:
            parts.append(
                "<p>"
                + " ".join(
                    f"<mark class='{'high' if s.count else 'low'}'>{p}</mark>"
                    for s, p in zip(spans, pieces, strict=True)
                )
                + "</p>"
            )
    rows = "".join(
        f"<tr><td>{s.sample}</td><td>{html.escape(s.text)}</td><td>{s.length}</td><td>{s.min_prob:.3f}</td>"
        f"<td>{s.count if s.count is not None else '-'}</td><td>{s.bucket or '-'}</td>"
        f"<td>{'prompt ' if s.in_prompt else ''}{'repetition' if s.degenerate else ''}</td>"
        f"<td>{', '.join(_doc_label(o) for o in s.docs[:5])}</td></tr>"
        for s in report.spans
    )
    body = (
        "".join(parts) + "<h2>Spans</h2><table><tr><th>sample</th><th>span</th><th>tokens</th><th>min p</th>"
        "<th>count</th><th>bucket</th><th>flags</th><th>documents</th></tr>" + rows + "</table>"
        f"<h2>Summary</h2><pre>{html.escape(json.dumps(report.summary(), indent=2))}</pre>"
    )
    return _page(title, body, report.to_dict())


def mining_renderable(report: Any) -> Any:
    from rich.console import Group
    from rich.table import Table

    table = Table(
        title=f"{len(report.spans)} low-perplexity spans in {len(report.samples)} samples", expand=True
    )
    for col in ("sample", "span", "len", "min p", "count", "bucket", "flags", "documents"):
        table.add_column(col, overflow="fold")
    for s in report.spans:
        flags = " ".join(f for f, on in (("prompt", s.in_prompt), ("repetition", s.degenerate)) if on)
        docs = ", ".join(o.doc_id for o in s.docs[:3]) + (" …" if len(s.docs) > 3 else "")
        table.add_row(
            str(s.sample),
            f"[bold]{s.text.strip()}[/]",
            str(s.length),
            f"{s.min_prob:.2f}",
            "-" if s.count is None else str(s.count),
            s.bucket or "-",
            flags,
            docs,
        )
    summ = report.summary()
    buckets = summ["all"]["buckets"]
    lines = Table.grid(padding=(0, 2))
    lines.add_row("matched share", _pct(summ["all"]["matched_share"]))
    for b, v in buckets.items():
        lines.add_row(b, _pct(v))
    lines.add_row("flagged (prompt / repetition)", f"{summ['in_prompt']} / {summ['degenerate']}")
    return Group(table, lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
