"""The evaluation report: an HTML page (and the same as Markdown) with the metrics table, the loss curve and a
gallery of images with the reference and each model's caption side by side. No JavaScript, no CDN: it opens
from disk, offline."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from .rundir import read_jsonl


def loss_svg(metrics_file: Path, width: int = 640, height: int = 280) -> str | None:
    """Training (and validation) loss against step as an SVG line chart; None without a loss log."""
    if not metrics_file.exists():
        return None
    records = read_jsonl(metrics_file)
    series = {
        "train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "validation loss": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    pad = 48
    points = [p for s in series.values() for p in s if p[1] > 0 and math.isfinite(p[1])]
    x_max = max(p[0] for p in points) or 1
    # Log scale: a fine-tune's loss falls by orders of magnitude, and the tail is where the story is.
    lo, hi = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
    span = (hi - lo) or 1.0

    def xy(step: float, loss: float) -> str:
        y = (math.log10(max(loss, 10**lo)) - lo) / span
        return f"{pad + (width - 2 * pad) * step / x_max:.1f},{height - pad - (height - 2 * pad) * y:.1f}"

    colours = {"train loss": "#1f77b4", "validation loss": "#d62728"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">step (0 to {x_max})</text>',
        f'<text x="{pad - 6}" y="{pad}" text-anchor="end">{10**hi:.3g}</text>',
        f'<text x="{pad - 6}" y="{height - pad}" text-anchor="end">{10**lo:.3g}</text>',
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
        "loss (log scale)</text>",
    ]
    for i, (name, pts) in enumerate(series.items()):
        line = " ".join(xy(s, v) for s, v in pts if v > 0 and math.isfinite(v))
        parts.append(f'<polyline fill="none" stroke="{colours[name]}" stroke-width="2" points="{line}"/>')
        parts.append(
            f'<text x="{width - pad}" y="{pad + 16 * i}" text-anchor="end" fill="{colours[name]}">'
            f"{name}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(
    out: Path,
    title: str,
    table: dict[str, dict[str, float]],
    rows: list[dict[str, Any]],
    notes: list[str],
    has_loss: bool,
) -> None:
    """report.html and report.md in `out`. `rows`: {"image": relative path, "references": [...],
    "captions": {model: caption}} per image; `table`: {model: {metric: value}}."""
    metrics = list(next(iter(table.values())))
    models = list(table)
    e = html.escape
    head = "".join(f"<th>{e(m)}</th>" for m in metrics)
    body = "".join(
        f"<tr><td>{e(name)}</td>" + "".join(f"<td>{_fmt(scores.get(m, ''))}</td>" for m in metrics) + "</tr>"
        for name, scores in table.items()
    )
    cards = []
    for row in rows:
        refs = "".join(f"<li>{e(r)}</li>" for r in row["references"])
        caps = "".join(f"<p><b>{e(m)}:</b> {e(row['captions'][m])}</p>" for m in models)
        if "question" in row:
            caps = f"<p><b>question:</b> {e(row['question'])}</p>" + caps
        cards.append(
            f'<div class="card"><img src="{e(row["image"])}" alt=""><p><b>reference:</b></p>'
            f"<ul>{refs}</ul>{caps}</div>"
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child {{ text-align: left; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 14px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px; }} .card img {{ width: 100%; }}
.card p, .card ul {{ margin: 4px 0; font-size: 14px; }}
</style></head><body>
<h1>{e(title)}</h1>
<h2>Metrics</h2>
<table><tr><th>model</th>{head}</tr>{body}</table>
<ul>{"".join(f"<li>{e(n)}</li>" for n in notes)}</ul>
{'<h2>Training loss</h2><img src="loss.svg" alt="loss curve">' if has_loss else ""}
<h2>Gallery</h2>
<div class="gallery">{"".join(cards)}</div>
</body></html>
"""
    (out / "report.html").write_text(page)
    md = [
        f"# {title}",
        "",
        "## Metrics",
        "",
        "| model | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    md += [
        f"| {name} | " + " | ".join(_fmt(s.get(m, "")) for m in metrics) + " |" for name, s in table.items()
    ]
    md += [""] + [f"- {n}" for n in notes]
    if has_loss:
        md += ["", "## Training loss", "", "![loss curve](loss.svg)"]
    md += [
        "",
        "## Gallery",
        "",
        "| image | reference | " + " | ".join(models) + " |",
        "|---" * (len(models) + 2) + "|",
    ]
    for row in rows:
        cells = [f"![]({row['image']})", "<br>".join(row["references"])] + [
            row["captions"][m] for m in models
        ]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    (out / "report.md").write_text("\n".join(md) + "\n")
