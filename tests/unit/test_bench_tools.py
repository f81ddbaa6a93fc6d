"""``xenpv bench``'s tools: the shared result shape (``report``), ``--plot`` / ``bench plot``
output files, ``bench compare``, and the one-line errors for missing prerequisites.

The figures come from real (short) runs of ``xenpv bench fuzz``; no test asserts a timing.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from xenpv.bench import report
from xenpv.bench.report import Ratio, Rounds
from xenpv.cli.bench import render_result, summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def xenpv(*args: str, env: dict[str, str] | None = None,
          timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xenpv", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero exit, no traceback, exactly one line on stderr containing ``needles``."""
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def shadowed_env(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which importing ``module`` fails as if it were not installed."""
    pkg = tmp_path / "shadow" / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path / "shadow"), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real ``bench fuzz --quick`` run of two rounds (``--rounds`` overrides
    ``--quick``'s one) with ``--plot`` (SVG) and ``--output``."""
    out = tmp_path_factory.mktemp("fuzz")
    svg, js = out / "fuzz.svg", out / "fuzz.json"
    res = xenpv("bench", "fuzz", "--quick", "--rounds", "2", "--plot", str(svg),
                "--output", str(js))
    assert res.returncode == 0, res.stderr
    return {"svg": svg, "json": js, "result": json.loads(js.read_text()), "text": res.stdout}


def svg_text(path: Path) -> str:
    root = ET.parse(path).getroot()  # raises if the file is not well-formed XML
    assert root.tag.endswith("svg")
    return " ".join("".join(el.itertext()) for el in root.iter() if el.tag.endswith("text"))


# ---------------------------------------------------------------------------- report


def test_rounds_result_pairs_ratios_and_checks_targets() -> None:
    rec = Rounds("demo")
    for a, b in ((10.0, 5.0), (30.0, 10.0), (20.0, 10.0)):
        rec.add("ours_per_s", a)
        rec.add("anchor_per_s", b)
        rec.add("group.ours_rtt_us", a)
    res = rec.result(ratios={"ours/anchor": Ratio("ours_per_s", "anchor_per_s", ">= 2.5"),
                             "rtt": Ratio("group.ours_rtt_us", "anchor_per_s", "<= 1.5")})
    assert res["ours_per_s"] == 20.0 and res["group"]["ours_rtt_us"] == 20.0
    assert res["ratios"]["ours/anchor"] == 2.0  # median of 2, 3, 2: paired, not 20/10
    assert res["ratio_spread"]["ours/anchor"] == [2.0, 3.0]
    assert res["targets_met"] == {"ours/anchor": False, "rtt": False}
    assert res["spread"]["ours_per_s"] == [10.0, 30.0]
    assert res["better"]["group.ours_rtt_us"] == "lower"
    assert res["better"]["rtt"] == "lower" and res["better"]["ours/anchor"] == "higher"
    assert res["anchors"]["ours/anchor"] == ["ours_per_s", "anchor_per_s"]
    cond = res["conditions"]
    assert cond["cpus"] == os.cpu_count() and len(cond["load_before"]) == 3
    assert cond["cpu_model"]
    # 10..30 around 20 is spread wider than the limit: the run says it is noisy
    assert cond["noisy"] and any("ours_per_s" in r for r in cond["noise"])


def test_noise_reasons_name_load_and_spread() -> None:
    assert report.noise([0.5, 0, 0], [1.0, 0, 0], {"x": 0.1}, rounds=5, cpus=2) == []
    reasons = report.noise([3.0, 0, 0], [5.0, 0, 0], {"x": 0.5}, rounds=1, cpus=2)
    assert len(reasons) == 4
    assert "before" in reasons[0] and "after" in reasons[1] and "x:" in reasons[2]
    assert "one round" in reasons[3]


def test_text_output_marks_each_ratio_met_or_missed() -> None:
    rec = Rounds("demo")
    for v in (1.0, 1.0):
        rec.add("a", v)
        rec.add("b", 2 * v)
    text = render_result(rec.result(ratios={"a/b": Ratio("a", "b", ">= 0.4"),
                                            "b/a": Ratio("b", "a", ">= 3"),
                                            "info": Ratio("a", "b")}))
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()}
    assert lines["a/b"].endswith("target >= 0.4: met")
    assert lines["b/a"].endswith("target >= 3: MISSED")
    assert "target" not in lines["info"]


def test_bench_all_summary_counts_targets_met_and_names_the_missed() -> None:
    rec = Rounds("demo")
    rec.add("a", 1.0)
    rec.add("b", 2.0)
    res = rec.result(ratios={"a/b": Ratio("a", "b", ">= 0.4"), "b/a": Ratio("b", "a", ">= 3")})
    text = summary({"benchmarks": {"demo": res}})
    assert "demo: 1 of 2 targets met; missed: b/a (noisy run)" in text


# ---------------------------------------------------------------------------- plot


def test_plot_svg_names_every_benchmark_figure_and_ratio(fuzz_run: dict[str, Any]) -> None:
    text = svg_text(fuzz_run["svg"])
    result = fuzz_run["result"]
    assert "fuzz" in text and "2 rounds" in text and fuzz_run["result"]["rounds"] == 2
    for name, ratio in result["ratios"].items():
        assert name in text, name
        assert f"{ratio:.3g}" in text, (name, ratio)
        verdict = "met" if result["targets_met"][name] else "missed"
        assert f"{ratio:.3g}  target >= 0.1: {verdict}" in text


def test_bench_plot_png_from_saved_result(fuzz_run: dict[str, Any], tmp_path: Path) -> None:
    png = tmp_path / "fuzz.png"
    res = xenpv("bench", "plot", str(fuzz_run["json"]), str(png))
    assert res.returncode == 0, res.stderr
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000  # a real chart of 18 rows, not an empty canvas


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    out = tmp_path / "x.svg"
    res = xenpv("bench", "fuzz", "--quick", "--plot", str(out),
                env=shadowed_env(tmp_path, "matplotlib"))
    assert_one_line_error(res, "pip install 'xenpv[plot]'")
    assert not out.exists() and res.stdout == ""  # nothing ran


def test_plot_to_an_unknown_format_is_a_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(xenpv("bench", "fuzz", "--quick", "--plot", str(tmp_path / "x.gif")),
                          ".svg")


# ---------------------------------------------------------------------------- compare


def test_compare_names_changed_keys_and_flags_regressions(fuzz_run: dict[str, Any],
                                                          tmp_path: Path) -> None:
    old = fuzz_run["result"]
    new = copy.deepcopy(old)
    target = next(iter(old["ratios"]))
    key = f"hostile_ops_per_s.{target}"
    # a regression far beyond the rounds' spread ...
    new["hostile_ops_per_s"][target] /= 10
    new["spread"][key] = [v / 10 for v in new["spread"][key]]
    new["runs"][key] = [v / 10 for v in new["runs"][key]]
    new["ratios"][target] /= 10
    new["ratio_spread"][target] = [v / 10 for v in new["ratio_spread"][target]]
    # ... one key dropped and one added
    gone = list(old["ratios"])[-1]
    del new["ratios"][gone]
    new["ratios"]["brand-new"] = 1.0
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    res = xenpv("bench", "compare", str(a), str(b))
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert "REGRESSION" in lines[f"fuzz.{key}"]
    assert "0.100x" in lines[f"fuzz.{key}"]
    assert "REGRESSION" in lines[f"fuzz.ratios.{target}"]
    unchanged = f"fuzz.benign_ops_per_s.{target}"
    assert "1.000x" in lines[unchanged] and "REGRESSION" not in lines[unchanged]
    assert f"fuzz.ratios.{gone}: removed" in res.stdout
    assert "fuzz.ratios.brand-new: added" in res.stdout
    assert "2 regression(s)" in res.stdout


def test_compare_of_a_missing_or_broken_file_is_a_one_line_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert_one_line_error(xenpv("bench", "compare", str(broken), str(broken)),
                          "not a benchmark result")
    assert_one_line_error(xenpv("bench", "compare", str(tmp_path / "none.json"),
                                str(broken)), "none.json")


# ---------------------------------------------------------------------------- prerequisites


@pytest.mark.parametrize("bench", ["ring", "vchan", "xenstore", "block", "all"])
def test_bench_without_peers_says_what_to_run(bench: str, tmp_path: Path) -> None:
    env = dict(os.environ, XENPV_PEERS_DIR=str(tmp_path / "empty"))
    assert_one_line_error(xenpv("bench", bench, "--quick", env=env, timeout=60),
                          f"xenpv bench {bench}:", "xenpv peers fetch")


def test_bench_xenstore_without_pyxs_says_what_to_install(tmp_path: Path) -> None:
    assert_one_line_error(xenpv("bench", "xenstore", "--quick",
                                env=shadowed_env(tmp_path, "pyxs"), timeout=60),
                          "pip install pyxs")
