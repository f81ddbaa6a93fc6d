"""The shared shape of every benchmark's result: interleaved rounds, medians, spreads,
paired ratios against anchors, targets, and the conditions of the run.

Every ``xenpv bench NAME`` collects its samples in a :class:`Rounds` (one list of figures
per key, one entry per interleaved round) and turns them into its result with
:meth:`Rounds.result`.  The result is a JSON-able dict:

* each figure's median under its key (a dotted key ``a.b`` is stored nested, as
  ``result["a"]["b"]``);
* ``ratios``: each ratio against its anchor, the median of the per-round ratios when both
  figures have one sample per round (a paired statistic: drift shared by the two figures
  of a round cancels), otherwise the ratio of the medians;
* ``targets`` (``">= 0.8"`` / ``"<= 1.5"``) and ``targets_met`` (``true``/``false``) for the
  ratios the project sets goals for;
* ``spread`` / ``ratio_spread``: lowest and highest round; ``runs``: every round's figure;
* ``units``, ``anchors`` (``ratio: [figure, anchor]``, what :mod:`xenpv.bench.plot` draws
  side by side) and ``better`` (``"higher"`` or ``"lower"`` per figure and ratio, what
  :mod:`xenpv.bench.compare` calls a regression);
* ``conditions``: the placement, the CPU model and count, the 1/5/15-minute load averages
  before and after the run, and the noise verdict (:func:`noise`).

A run is flagged noisy (``conditions.noisy``, with the reasons in ``conditions.noise``)
when the 1-minute load before it exceeded the CPU count, when the load after it exceeded
the CPU count plus the two CPUs a benchmark keeps busy itself, or when a figure's or a
targeted ratio's rounds are spread wider than :data:`NOISE_SPREAD` of their median
(interquartile range with four rounds or more, full range below that).
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

#: Rounds spread wider than this fraction of their median make a run "noisy".
NOISE_SPREAD = 0.3
#: CPUs a benchmark may keep busy itself (a sender and a receiver), allowed on top of the
#: CPU count in the load measured after the run.
OWN_CPUS = 2

#: Result sections that are not figures (skipped when comparing or listing figures).
META_KEYS = frozenset({
    "benchmark", "ratios", "targets", "targets_met", "spread", "ratio_spread", "runs",
    "rounds", "units", "anchors", "better", "conditions", "setup", "placement", "measured",
    "detail", "two_process_detail", "unit",
})


class Ratio(NamedTuple):
    """A ratio ``figure / anchor`` (dotted figure keys), its target (``">= 0.5"``,
    ``"<= 1.3"`` or ``None``) and which way is better (default: from the target, else
    the figure's own direction)."""

    figure: str
    anchor: str
    target: str | None = None
    better: str | None = None


def add_rounds_option(parser: Any, default: int) -> None:
    """The ``--rounds`` option every benchmark has (``--quick`` alone means one round)."""
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help=f"interleaved rounds, medians reported (default {default}; "
                             "1 with --quick)")


def rounds_of(args: Any, default: int) -> int:
    """The rounds asked for: ``--rounds``, else 1 for ``--quick``, else ``default``."""
    rounds = getattr(args, "rounds", None)
    if rounds:
        return max(1, int(rounds))
    return 1 if getattr(args, "quick", False) else default


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages (zeros where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


def better_of(key: str) -> str:
    """Default direction of a figure: latencies (``*_us``, ``*_ns``, ``*_ms``) are better
    lower, everything else (rates, throughputs) higher."""
    leaf = key.rsplit(".", 1)[-1]
    return "lower" if leaf.endswith(("_us", "_ns", "_ms")) or "rtt" in leaf else "higher"


def parse_target(target: str) -> tuple[str, float]:
    """``">= 0.8"`` -> ``(">=", 0.8)``."""
    op, _, value = target.strip().partition(" ")
    if op not in (">=", "<="):
        raise ValueError(f"bad target {target!r} (want '>= X' or '<= X')")
    return op, float(value)


def target_met(value: float, target: str) -> bool:
    """Whether ``value`` meets ``target``."""
    op, bound = parse_target(target)
    return value >= bound if op == ">=" else value <= bound


def relative_spread(values: list[float]) -> float:
    """How widely ``values`` are spread around their median: the interquartile range with
    four values or more, the full range below that, over the median (0 for one value)."""
    if len(values) < 2:
        return 0.0
    mid = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        width = q3 - q1
    else:
        width = max(values) - min(values)
    return abs(width / mid) if mid else 0.0


def noise(load_before: list[float], load_after: list[float], spreads: Mapping[str, float],
          rounds: int, cpus: int | None = None) -> list[str]:
    """Why a run should not be trusted (empty: nothing against it).

    ``spreads`` maps a figure or ratio to its :func:`relative_spread`."""
    cpus = cpus or os.cpu_count() or 1
    reasons: list[str] = []
    if load_before[0] > cpus:
        reasons.append(f"load {load_before[0]:.2f} before the run, above the {cpus} CPUs")
    if load_after[0] > cpus + OWN_CPUS:
        reasons.append(f"load {load_after[0]:.2f} after the run, above the {cpus} CPUs "
                       f"+ {OWN_CPUS} of the benchmark's own")
    for key, spread in spreads.items():
        if spread > NOISE_SPREAD:
            reasons.append(f"{key}: rounds spread {spread:.0%} of the median "
                           f"(> {NOISE_SPREAD:.0%})")
    if rounds < 2:
        reasons.append("one round only: the spread is unknown")
    return reasons


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        out = out.setdefault(p, {})
    out[leaf] = value


def get(result: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted key in a result (``KeyError`` if absent)."""
    value: Any = result
    for part in key.split("."):
        value = value[part]
    return value


class Rounds:
    """Samples of a benchmark's figures over interleaved rounds, and the conditions of the
    run (load before is taken when the object is made, load after in :meth:`result`)."""

    def __init__(self, benchmark: str) -> None:
        self.benchmark = benchmark
        self.samples: dict[str, list[float]] = {}
        self.load_before = loadavg()

    def add(self, key: str, value: float) -> None:
        """Record one round's figure for ``key``."""
        self.samples.setdefault(key, []).append(float(value))

    def interleave(self, rounds: int, measures: Mapping[str, Callable[[], float]]) -> None:
        """Run ``rounds`` rounds of every measure; each measure goes first in turn, so none
        always meets the machine in the same state."""
        order = list(measures)
        for r in range(rounds):
            shift = r % len(order) if order else 0
            for key in order[shift:] + order[:shift]:
                self.add(key, measures[key]())

    def rounds(self) -> int:
        """The number of rounds (the most samples any figure has)."""
        return max((len(v) for v in self.samples.values()), default=0)

    def ratio(self, figure: str, anchor: str) -> tuple[float, list[float]]:
        """Paired median ratio and the per-round ratios (one entry per round when both
        figures have the same number of samples; else the ratio of the medians)."""
        a, b = self.samples[figure], self.samples[anchor]
        if len(a) == len(b):
            per_round = [x / y if y else 0.0 for x, y in zip(a, b, strict=True)]
            return statistics.median(per_round), per_round
        mb = statistics.median(b)
        value = statistics.median(a) / mb if mb else 0.0
        return value, [value]

    def result(self, *, units: Mapping[str, str] | None = None,
               ratios: Mapping[str, Ratio] | None = None,
               placement: Any = None, better: Mapping[str, str] | None = None,
               noisy_keys: Iterable[str] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The result dict (see the module's docstring).  ``noisy_keys`` limits the spread
        check to those figures and ratios (default: every figure and targeted ratio);
        ``extra`` entries are added as they are."""
        ratios = dict(ratios or {})
        out: dict[str, Any] = {"benchmark": self.benchmark}
        # plain figures first, then the grouped (dotted) ones
        self.samples = {k: self.samples[k] for k in sorted(self.samples, key=lambda k: "." in k)}
        for key, values in self.samples.items():
            _put(out, key, statistics.median(values))
        directions = {k: better_of(k) for k in self.samples}
        directions.update(better or {})
        rvalues: dict[str, float] = {}
        rspread: dict[str, list[float]] = {}
        per_round: dict[str, list[float]] = {}
        for name, r in ratios.items():
            value, rounds = self.ratio(r.figure, r.anchor)
            rvalues[name] = value
            rspread[name] = [min(rounds), max(rounds)]
            per_round[name] = rounds
            if r.better:
                directions[name] = r.better
            elif r.target:
                directions[name] = "higher" if parse_target(r.target)[0] == ">=" else "lower"
            else:
                directions[name] = directions.get(r.figure, "higher")
        targets = {n: r.target for n, r in ratios.items() if r.target}
        out["ratios"] = rvalues
        out["targets"] = targets
        out["targets_met"] = {n: target_met(rvalues[n], t) for n, t in targets.items()}
        out["ratio_spread"] = rspread
        out["spread"] = {k: [min(v), max(v)] for k, v in self.samples.items()}
        out["runs"] = dict(self.samples)
        out["rounds"] = self.rounds()
        out["units"] = dict(units or {})
        out["anchors"] = {n: [r.figure, r.anchor] for n, r in ratios.items()}
        out["better"] = directions
        checked = set(noisy_keys) if noisy_keys is not None else set(self.samples) | set(targets)
        spreads = {k: relative_spread(v) for k, v in self.samples.items() if k in checked}
        spreads.update({n: relative_spread(v) for n, v in per_round.items() if n in checked})
        load_after = loadavg()
        reasons = noise(self.load_before, load_after, spreads, self.rounds())
        out["conditions"] = {
            "placement": placement,
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "allowed_cpus": sorted(os.sched_getaffinity(0)),
            "load_before": self.load_before,
            "load_after": load_after,
            "noise_spread_limit": NOISE_SPREAD,
            "noisy": bool(reasons),
            "noise": reasons,
        }
        out.update(extra or {})
        return out


def figure_keys(result: Mapping[str, Any]) -> list[str]:
    """The dotted keys of a result's figures (those with a spread; for results written
    before spreads were recorded, every numeric entry outside the metadata sections)."""
    if isinstance(result.get("spread"), dict) and result["spread"]:
        return list(result["spread"])
    keys: list[str] = []

    def walk(prefix: str, obj: Mapping[str, Any]) -> None:
        for k, v in obj.items():
            if not prefix and k in META_KEYS:
                continue
            key = f"{prefix}{k}"
            if isinstance(v, bool):
                continue
            if isinstance(v, int | float):
                keys.append(key)
            elif isinstance(v, Mapping):
                walk(key + ".", v)

    walk("", result)
    return keys
