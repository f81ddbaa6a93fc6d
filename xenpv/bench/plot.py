"""Draw benchmark results: each figure beside its anchor, with the spread of the rounds.

One dot chart per benchmark (stacked in one file for ``xenpv bench all``): a row per ratio
(named as in the result's ``ratios``, with the figures' unit), the figure as a filled dot
and its anchor as a hollow one, each with a bar from its lowest
to its highest round, on a logarithmic axis (so the distance between the dots is the
ratio, whatever the unit).  Where the ratio has a target, a bar marks where the figure
has to be (the anchor's median times the target), green when met and red when missed; the
ratio and the verdict are written at the row's end (both the paired median of the
per-round ratios, so the dots' distance, a ratio of medians, may differ slightly).  The format follows the file's suffix
(``.svg`` keeps its text as text, so names and values are searchable; ``.png``, ``.pdf``).

Plotting needs matplotlib, an optional extra: ``pip install 'xenpv[plot]'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xenpv.bench.report import get
from xenpv.errors import LocalError

INSTALL_HINT = "pip install 'xenpv[plot]'"
SUFFIXES = (".svg", ".png", ".pdf")


def require(path: str | Path | None = None) -> Any:
    """Import matplotlib (Agg backend) or raise a one-line :class:`LocalError` saying what
    to install; also check the output suffix when ``path`` is given."""
    if path is not None and Path(path).suffix.lower() not in SUFFIXES:
        raise LocalError(f"--plot {path}: the file must end in {', '.join(SUFFIXES)}")
    try:
        import matplotlib
    except ImportError:
        raise LocalError(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    return matplotlib


def results_of(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{benchmark: result}`` from one benchmark's result or a ``bench all`` document."""
    if isinstance(document.get("benchmarks"), Mapping):
        return {k: v for k, v in document["benchmarks"].items() if isinstance(v, Mapping)}
    return {str(document.get("benchmark", "bench")): document}


def _rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    spread = result.get("spread", {})
    units = result.get("units", {})
    for name, (figure, anchor) in result.get("anchors", {}).items():
        try:
            fv, av = float(get(result, figure)), float(get(result, anchor))
        except (KeyError, TypeError, ValueError):
            continue
        if fv <= 0 or av <= 0:
            continue
        rows.append({
            "name": name, "figure": figure, "anchor": anchor, "fv": fv, "av": av,
            "fs": spread.get(figure, [fv, fv]), "as": spread.get(anchor, [av, av]),
            "unit": units.get(figure, ""), "ratio": result.get("ratios", {}).get(name),
            "target": result.get("targets", {}).get(name),
            "met": result.get("targets_met", {}).get(name),
        })
    return rows


def _fmt(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.3g} M"
    if v >= 1e3:
        return f"{v / 1e3:.3g} k"
    return f"{v:.3g}"


def _title(name: str, result: Mapping[str, Any]) -> str:
    cond = result.get("conditions", {})
    parts = [name, f"{result.get('rounds', '?')} rounds"]
    placement = cond.get("placement")
    if isinstance(placement, Mapping):
        placement = placement.get("name")
    if placement:
        parts.append(f"placement {placement}")
    if cond.get("load_before"):
        parts.append(f"load {cond['load_before'][0]:.2f} → {cond.get('load_after', ['?'])[0]}")
    if cond.get("noisy"):
        parts.append("NOISY")
    return " · ".join(str(p) for p in parts)


def plot(document: Mapping[str, Any], path: str | Path) -> Path:
    """Draw ``document`` (a result or a ``bench all`` document) into ``path``."""
    matplotlib = require(path)
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in SVG
    import matplotlib.pyplot as plt

    charts = [(name, result, _rows(result)) for name, result in results_of(document).items()]
    charts = [c for c in charts if c[2]]
    if not charts:
        raise LocalError("nothing to plot: the result has no figures with anchors")
    heights = [len(rows) * 0.55 + 1.2 for _, _, rows in charts]
    fig, axes = plt.subplots(len(charts), 1, figsize=(12, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, result, rows) in zip(axes[:, 0], charts, strict=True):
        _draw(ax, name, result, rows)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def matplotlib_ticker() -> Any:
    """matplotlib's ticker module (imported once matplotlib is known to be there)."""
    import matplotlib.ticker

    return matplotlib.ticker


def _draw(ax: Any, name: str, result: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
    lo = min(min(r["fs"][0], r["as"][0], r["fv"], r["av"]) for r in rows)
    hi = max(max(r["fs"][1], r["as"][1], r["fv"], r["av"]) for r in rows)
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        for value, (low, high), face, dy in ((r["fv"], r["fs"], "C0", 0.12),
                                             (r["av"], r["as"], "white", -0.12)):
            ax.errorbar([value], [y + dy], xerr=[[value - low], [high - value]], fmt="o",
                        color="C0", markerfacecolor=face, capsize=3,
                        label=("figure" if face != "white" else "anchor") if i == 0 else None)
            ax.annotate(_fmt(value), (value, y + dy), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7)
        label = f"{r['ratio']:.3g}" if r["ratio"] is not None else ""
        if r["target"]:
            goal = r["av"] * float(r["target"].split()[1])
            color = "green" if r["met"] else "red"
            if goal > 0:
                ax.plot([goal], [y], marker="|", markersize=18, color=color)
                lo, hi = min(lo, goal), max(hi, goal)
            label += f"  target {r['target']}: {'met' if r['met'] else 'missed'}"
        ax.text(1.01, (y + 0.5) / len(rows), label, transform=ax.transAxes, fontsize=8,
                va="center", color="black" if r["met"] in (None, True) else "red")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"] + (f" [{r['unit']}]" if r["unit"] else "")
                        for r in reversed(rows)], fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    ax.set_xlim(lo / 2, hi * 2 if math.isfinite(hi) else None)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_title(_title(name, result), fontsize=10, loc="left")
    if any(r["target"] for r in rows):
        ax.plot([], [], marker="|", markersize=10, linestyle="none", color="green",
                label="where the figure must be (anchor x target; red: missed)")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncol=3, fontsize=7, frameon=False,
              title=None, borderaxespad=1.2)
    ax.grid(axis="x", which="both", alpha=0.3)
