"""Compare two benchmark results (``xenpv bench compare A.json B.json``).

Either file may hold one benchmark's result or a ``bench all`` document.  For every figure
and ratio present in both, a line gives old → new and new/old; a change is flagged as a
regression (or an improvement) only when it lies beyond the rounds' spread: the new
median is outside the old run's lowest to highest range in the worse (better) direction and
the old median outside the new run's range.  ``better`` in the results says which
direction is worse (latencies lower, rates higher).  A side without a spread (one round,
as ``--quick`` runs have) leaves its changes unjudged.  Keys present in one file only are
listed as added or removed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from xenpv.bench.plot import results_of
from xenpv.bench.report import better_of, figure_keys, get
from xenpv.errors import LocalError


class Change(NamedTuple):
    """One key's old and new median, their spreads and the verdict."""

    key: str
    old: float
    new: float
    verdict: str  # "regression", "improvement", "" (within the spread) or "unjudged"


def load(path: str | Path) -> dict[str, Any]:
    """Read a result file (one-line :class:`LocalError` if it is missing or not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise LocalError(f"{path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise LocalError(f"{path}: not a benchmark result (JSON error: {exc})") from None
    if not isinstance(data, dict):
        raise LocalError(f"{path}: not a benchmark result (a JSON object is expected)")
    return data


def _entries(result: Mapping[str, Any]) -> dict[str, tuple[float, list[float], str]]:
    """``key: (median, [low, high], better)`` for every figure and ratio."""
    out: dict[str, tuple[float, list[float], str]] = {}
    better = result.get("better", {})
    spread = result.get("spread", {})
    for key in figure_keys(result):
        try:
            v = float(get(result, key))
        except (KeyError, TypeError, ValueError):
            continue
        out[key] = (v, list(spread.get(key, [v, v])), better.get(key, better_of(key)))
    rspread = result.get("ratio_spread", {})
    for name, v in result.get("ratios", {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[f"ratios.{name}"] = (float(v), list(rspread.get(name, [v, v])),
                                     better.get(name, "higher"))
    return out


def _verdict(old: tuple[float, list[float], str], new: tuple[float, list[float], str]) -> str:
    (ov, (olo, ohi), better), (nv, (nlo, nhi), _) = old, new
    if olo == ohi or nlo == nhi:
        return "unjudged"  # one round (or identical rounds): no spread to judge by
    if nv < olo and ov > nhi:
        return "regression" if better == "higher" else "improvement"
    if nv > ohi and ov < nlo:
        return "improvement" if better == "higher" else "regression"
    return ""


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[Change], list[str],
                                                                   list[str]]:
    """Changes between two documents, and the keys only in ``a`` (removed) and only in
    ``b`` (added), every key prefixed with its benchmark's name."""
    ra, rb = results_of(a), results_of(b)
    changes: list[Change] = []
    removed: list[str] = []
    added: list[str] = []
    for bench in sorted(set(ra) | set(rb)):
        ea = _entries(ra[bench]) if bench in ra else {}
        eb = _entries(rb[bench]) if bench in rb else {}
        for key in ea:
            if key in eb:
                changes.append(Change(f"{bench}.{key}", ea[key][0], eb[key][0],
                                      _verdict(ea[key], eb[key])))
            else:
                removed.append(f"{bench}.{key}")
        added.extend(f"{bench}.{key}" for key in eb if key not in ea)
    return changes, removed, added


def _conditions(label: str, doc: Mapping[str, Any]) -> str:
    parts = []
    model = None
    for name, result in results_of(doc).items():
        cond = result.get("conditions", {})
        if not cond:
            continue
        noisy = "noisy" if cond.get("noisy") else "steady"
        parts.append(f"{name} load {cond.get('load_before', ['?'])[0]}→"
                     f"{cond.get('load_after', ['?'])[0]} {noisy}")
        model = cond.get("cpu_model")
    head = f"{label}: " + ("; ".join(parts) if parts else "no conditions recorded")
    return head + (f" ({model})" if parts and model else "")


def render(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str = "A",
           name_b: str = "B") -> str:
    """The comparison as text: a header per file, then one line per key."""
    changes, removed, added = compare(a, b)
    lines = [_conditions(f"old {name_a}", a), _conditions(f"new {name_b}", b), ""]
    width = max((len(c.key) for c in changes), default=10)
    for c in changes:
        ratio = f"{c.new / c.old:8.3f}x" if c.old else "       -"
        flag = {"regression": "  REGRESSION (beyond the rounds' spread)",
                "improvement": "  improved (beyond the rounds' spread)"}.get(c.verdict, "")
        lines.append(f"{c.key:<{width}}  {_num(c.old):>12} → {_num(c.new):<12} {ratio}{flag}")
    lines.extend(f"{k}: removed (only in {name_a})" for k in removed)
    lines.extend(f"{k}: added (only in {name_b})" for k in added)
    n = sum(c.verdict == "regression" for c in changes)
    unjudged = sum(c.verdict == "unjudged" for c in changes)
    lines.append("")
    lines.append(f"{len(changes)} keys compared, {n} regression(s) beyond the rounds' spread"
                 + (f"; {unjudged} not judged (a side has one round, so no spread)"
                    if unjudged else ""))
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
