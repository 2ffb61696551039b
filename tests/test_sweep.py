"""run.py sweeps (llmbench/sweep.py): comma lists run the cross product, one run.py process per
config, one table in every --output-format, and --plot's PNG."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, embedded_model_dir):
    return make_tiny_model("llama", tmp_path_factory.mktemp("sweep") / "llama",
                           embedded_model_dir)


def run_py(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], capture_output=True,
                          text=True, timeout=600)


def test_sweep_2x2x2_writes_table_formats_and_plot(tiny, tmp_path):
    done = run_py("--benchmark", "-m", str(tiny), "--dtype", "float32,bfloat16",
                  "--backend=stock,native", "--input-tokens", "8,16", "--max-new-tokens", "3",
                  "--num-iter", "1", "--num-warmup", "0", "--output-format", "md,csv,json",
                  "--plot", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    (root,) = tmp_path.glob("sweep-*")
    rows = json.loads((root / "sweep.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {(r["dtype"], r["backend"], r["input tokens"]) for r in rows} == {
        (d, b, t) for d in ("float32", "bfloat16") for b in ("stock", "native")
        for t in ("8", "16")}
    # every config measured by its own run, its report kept in its own folder
    for r in rows:
        report = json.loads(Path(r["report"]).read_text())
        assert report["prompt"]["tokens"] == int(r["input tokens"])
        assert report["backend"]["name"] == r["backend"]
        assert r["first token ms"] > 0 and r["next token ms"] > 0
    with open(root / "sweep.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    table = (root / "sweep.md").read_text()
    assert table.count("\n") == 10 and "| first token ms |" in table
    png = root / "first-token-vs-input-tokens.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (root / "sweep.jsonl").exists()  # only the formats asked for


def test_sweep_with_a_bad_value_stops_before_running(tiny, tmp_path):
    done = run_py("--benchmark", "-m", str(tiny), "--dtype", "float32,float64",
                  "--output-dir", str(tmp_path))
    assert done.returncode == 2
    assert "float64" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("sweep-*"))
    done = run_py("--benchmark", "-m", str(tiny), "--batch-size", "1,1",
                  "--output-dir", str(tmp_path))
    assert done.returncode == 2 and "distinct" in done.stderr
