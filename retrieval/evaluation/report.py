"""An evaluation written as a document: Markdown (with a PNG beside it) or one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from retrieval.durable import atomic_write_bytes
from retrieval.errors import ConfigError
from retrieval.evaluation.protocol import EvalReport
from retrieval.plotting import recall_curves

__all__ = ["render_markdown", "tables", "write_report"]

_NAMES = {"text_to_image": "text → image", "image_to_text": "image → text"}


def write_report(report: EvalReport, path: Path) -> list[Path]:
    """Write ``path`` (.md or .html) with the figures and the recall@K plot; returns the files written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".md", ".html", ".htm"):
        raise ConfigError(f"--report must end in .md or .html, got {path.name!r}")
    if suffix == ".md":
        plot = path.with_suffix(".png")
        recall_curves(report.directions, plot)
        atomic_write_bytes(path, render_markdown(report, plot.name).encode())
        return [path, plot]
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "recall.png"
        recall_curves(report.directions, plot)
        image = base64.b64encode(plot.read_bytes()).decode()
    body = render_markdown(report, f"data:image/png;base64,{image}")
    atomic_write_bytes(path, _html(body, report.source).encode())
    return [path]


def tables(report: EvalReport) -> list[list[list[str]]]:
    """Each table as rows of cells, the header first."""
    ks = sorted({k for d in report.directions for m in d.methods for k in m.summary.recall})
    retrieval = [
        ["direction", "search", "queries", *(f"R@{k}" for k in ks), "median rank", "mean rank", "vs exact"]
    ]
    for d in report.directions:
        for m in d.methods:
            s = m.summary
            retrieval.append(
                [
                    _NAMES.get(d.direction, d.direction),
                    m.method,
                    str(d.queries),
                    *(f"{s.recall[k]:.3f}" for k in ks),
                    "-" if s.median_rank is None else f"{s.median_rank:g}",
                    "-" if s.mean_rank is None else f"{s.mean_rank:.1f}",
                    "-" if m.recall_vs_exact is None else f"{m.recall_vs_exact:.3f}",
                ]
            )
    out = [retrieval]
    z = report.zeroshot
    if z is not None:
        out.append(
            [["label", "images", "top-1 accuracy", "precision@10 as a query"]]
            + [[r.label, str(r.images), f"{r.accuracy:.3f}", f"{r.precision_at_10:.3f}"] for r in z.labels]
        )
        if z.confusions:
            out.append([["true label", "predicted", "images"]] + [[t, p, str(n)] for t, p, n in z.confusions])
    return out


def render_markdown(report: EvalReport, plot: str) -> str:
    """The report as Markdown; ``plot`` is the image's link (a file name or a data URL)."""
    model = report.model
    lines = [
        f"# Evaluation of {report.source}",
        "",
        f"Model: `{model.get('checkpoint')}` (fingerprint `{str(model.get('fingerprint'))[:16]}`). "
        f"{report.images} images, {report.captions} distinct captions, {report.pairs} pairs; "
        f"{len(report.skipped)} rows skipped. {report.seconds:.1f} s.",
        "",
        "## Retrieval",
        "",
        "Ranks count ties against the query. `exact` is the model over these candidates; an index row is "
        "the same queries through that FAISS index, and `vs exact` its recall@10 against the exact top 10.",
        "",
    ]
    parts = tables(report)
    lines += [*_markdown_table(parts[0]), "", f"![recall@K]({plot})", ""]
    z = report.zeroshot
    if z is not None:
        lines += [
            "## Zero-shot classification",
            "",
            f"{z.images} labelled images: top-1 accuracy **{z.top1:.3f}**, top-5 **{z.top5:.3f}**; "
            f"mean precision@10 of the labels as text queries **{z.mean_precision_at_10:.3f}**. "
            f"Prompts: {', '.join(f'`{t}`' for t in z.templates)}.",
            "",
        ]
        lines += [*_markdown_table(parts[1]), ""]
        if len(parts) > 2:
            lines += ["Most frequent confusions:", "", *_markdown_table(parts[2]), ""]
    if report.skipped:
        lines += ["## Skipped", ""] + [f"- `{o.source}`: {o.reason}" for o in report.skipped[:50]]
        if len(report.skipped) > 50:
            lines.append(f"- ... {len(report.skipped) - 50} more")
    return "\n".join(lines) + "\n"


def _markdown_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return out + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]


def _html(markdown: str, title: str) -> str:
    """A plain HTML rendering of the Markdown this module writes (headings, tables, image, lists)."""
    out = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font:14px sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
    ]
    table: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not line.startswith("|---"):
                cells = [html.escape(c.strip().replace("\\|", "|")) for c in line.strip("|").split(" | ")]
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            out.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("!["):
            out.append(f"<p><img alt='recall@K' src='{html.escape(line.split('](', 1)[1][:-1])}'></p>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if table:
        out.append("<table>" + "".join(table) + "</table>")
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """``code`` and **bold** spans, everything else escaped."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
