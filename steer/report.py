"""A self-contained HTML page of a run: ESS and log_ml over steps, resampling events, and the particles
with their weights at every step (people would rather look at a run than read its numbers).
`posterior` is a `steer.smc.Posterior` (`Posterior.write_html` calls `write_html`; this module sits
below it, so it names no type of it)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write_text

_STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:20px} h2{font-size:16px;margin-top:2em} table{border-collapse:collapse;width:100%}
td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.bar{background:#4a7bd0;height:10px;display:inline-block} .num{font-variant-numeric:tabular-nums;white-space:nowrap}
.text{font-family:ui-monospace,monospace;white-space:pre-wrap} .dead{color:#bbb} .rs{color:#c0392b;font-weight:600}
details{margin:4px 0} summary{cursor:pointer} svg text{font-size:11px;fill:#555}
"""


def _line_chart(values: list[float], *, title: str, y_max: float | None = None, marks: list[int] = (),
                width: int = 640, height: int = 160) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return f"<p>{html.escape(title)}: no finite values</p>"
    lo = min(0.0, min(finite)) if y_max is not None else min(finite)
    hi = y_max if y_max is not None else max(finite)
    hi = hi if hi > lo else lo + 1.0
    pad, n = 36, len(values)

    def x(i: int) -> float:
        return pad + (width - pad - 8) * (i / max(n - 1, 1))

    def y(v: float) -> float:
        return height - 20 - (height - 30) * (v - lo) / (hi - lo)

    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if math.isfinite(v))
    marks_svg = "".join(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="10" y2="{height - 20}" stroke="#e8a0a0"/>'
                        for i in marks)
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="{pad}" y="10">{html.escape(title)}</text>{marks_svg}'
            f'<line x1="{pad}" x2="{width - 8}" y1="{height - 20}" y2="{height - 20}" stroke="#999"/>'
            f'<text x="2" y="{y(hi) + 4:.1f}">{hi:.3g}</text><text x="2" y="{y(lo):.1f}">{lo:.3g}</text>'
            f'<text x="{pad}" y="{height - 4}">step 1</text><text x="{width - 60}" y="{height - 4}">step {n}</text>'
            f'<polyline fill="none" stroke="#4a7bd0" stroke-width="2" points="{points}"/></svg>')


def _weights(log_weights: list[float]) -> np.ndarray:
    lw = np.asarray(log_weights, dtype=float)
    top = lw.max()
    if not math.isfinite(top):
        return np.zeros_like(lw)
    w = np.exp(lw - top)
    return w / w.sum()


def render_html(posterior: Any, title: str = "steer run") -> str:
    """The page as a string; see `write_html`."""
    trace = posterior.trace
    n = len(posterior.particles)
    resampled = [i for i, r in enumerate(trace) if r.resampled]
    s = posterior.summary()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='num'>method <b>{s['method']}</b> · {n} particles · {s['steps']} steps · "
             f"log_ml <b>{s['log_ml']:.4f}</b> · final ESS {s['ess']:.2f} · resampled {s['resampled']} times · "
             f"{s['seconds']:.2f}s · seed {s['seed']}</p>",
             _line_chart([r.ess for r in trace], title="ESS after each step (red: resampling)", y_max=float(n),
                         marks=resampled),
             _line_chart([r.log_ml for r in trace], title="running log marginal likelihood estimate"),
             _line_chart([float(r.live) for r in trace], title="live particles", y_max=float(n)),
             "<h2>Posterior</h2><table><tr><th>probability</th><th></th><th>result</th></tr>"]
    for result, p in posterior.distribution().items():
        parts.append(f"<tr><td class='num'>{p:.4f}</td><td><span class='bar' style='width:{200 * p:.1f}px'>"
                     f"</span></td><td class='text'>{html.escape(str(result))}</td></tr>")
    parts.append("</table><h2>Steps</h2>")
    for r in trace:
        w = _weights(r.log_weights)
        flag = " <span class='rs'>resampled</span>" if r.resampled else ""
        parts.append(f"<details><summary class='num'>step {r.step}: ESS {r.ess:.2f}, live {r.live}, "
                     f"log_ml {r.log_ml:.3f}{flag}</summary><table><tr><th>#</th><th>weight</th><th></th>"
                     f"<th>log w</th><th>particle</th></tr>")
        for i, (wi, lwi) in enumerate(zip(w, r.log_weights)):
            text = r.particles[i] if r.particles else ""
            dead = " class='dead'" if lwi == float("-inf") else ""
            parts.append(f"<tr{dead}><td>{i}</td><td class='num'>{wi:.3f}</td><td><span class='bar' "
                         f"style='width:{150 * wi:.1f}px'></span></td><td class='num'>{lwi:.3f}</td>"
                         f"<td class='text'>{html.escape(text)}</td></tr>")
        if r.ancestors is not None:
            parts.append(f"<tr><td colspan='5' class='num'>ancestors: {r.ancestors}</td></tr>")
        parts.append("</table></details>")
    parts.append("</body></html>")
    return "".join(parts)


def write_html(posterior: Any, path: str | Path, title: str = "steer run") -> Path:
    """Write a self-contained HTML report of `posterior` (run with record_particles=True to see texts)."""

    path = Path(path)
    atomic_write_text(path, render_html(posterior, title))  # a failed write keeps an earlier report whole
    return path
