"""tools/compare_reports.py (llmbench.compare_reports) on real reports of the generation
benchmark: a rerun of the same config is not flagged, an injected 30% slowdown is (and fails
--fail-above), bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

from llmbench.cli.tools import compare_reports_main

# the reports' timings are measured while no other test runs (conftest.machine_share)
pytestmark = pytest.mark.quiet


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, embedded_model_dir):
    from llmbench.generation import main

    root = tmp_path_factory.mktemp("compare_reports")
    folder = make_tiny_model("llama", root / "llama", embedded_model_dir)
    reports = []
    for run in ("a", "b"):
        out = root / run
        assert main(["-m", str(folder), "--backend", "native", "--greedy", "--token-latency",
                     "--max-new-tokens", "16", "--num-iter", "8", "--num-warmup", "2",
                     "--output-dir", str(out)]) == 0
        reports.append(next(out.glob("*.json")))
    return reports


def slowed(report: Path, factor: float, target: Path) -> Path:
    data = json.loads(report.read_text())
    for it in data["iterations"]:
        it["seconds"] *= factor
        it["step_latencies_s"] = [t * factor for t in it["step_latencies_s"] or []]
    target.write_text(json.dumps(data))
    return target


def test_rerun_is_not_flagged(two_runs, capsys):
    # --min-change 50: on two shared cores a tiny model's medians move by more than its
    # decode steps' own p10-p90 band between two runs a second apart (28% once, with another
    # process busy); a real regression gate sets the floor it can afford.
    assert compare_reports_main([str(two_runs[0]), str(two_runs[1]), "--json",
                                 "--min-change", "50", "--fail-above", "50"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["metric"] for r in rows} == {"first_token_ms", "next_token_ms", "iteration_ms"}
    assert all(r["verdict"] == "same" for r in rows), rows


def steadied(report: Path, target: Path) -> Path:
    """The report with every measured iteration a copy of its first: no spread of its own, so
    whether a change is flagged does not depend on how busy the machine was during the run
    (under a parallel build a tiny model's runs spread by more than 30%)."""
    data = json.loads(report.read_text())
    data["iterations"] = [dict(data["iterations"][0]) for _ in data["iterations"]]
    target.write_text(json.dumps(data))
    return target


def test_injected_slowdown_is_flagged(two_runs, tmp_path, capsys):
    before = steadied(two_runs[0], tmp_path / "steady.json")
    after = slowed(before, 1.3, tmp_path / "slow.json")
    code = compare_reports_main([str(before), str(after), "--fail-above", "10"])
    captured = capsys.readouterr()
    assert code == 1
    assert "**slower**" in captured.out and "1.300x" in captured.out
    assert "30% slower (above --fail-above 10%)" in captured.err
    # a folder of reports matches configs by what was run, not by file name
    folder = tmp_path / "set"
    folder.mkdir()
    slowed(before, 0.7, folder / "fast.json")
    assert compare_reports_main([str(before), str(folder), "--fail-above", "10"]) == 0
    assert "**faster**" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    assert compare_reports_main([str(tmp_path / "x.json"), str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: compare_reports:") and "\n" not in err
