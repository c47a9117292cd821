"""The spectral benchmark (analysis/study/bench.py, scripts/bench_spectral.py) runs and reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.study.bench import format_table, run

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_preset():
    result = run(["tiny"], repeats=1)
    row = result["rows"][0]
    assert row["preset"] == "tiny" and row["d_head"] == 32
    assert 0 < row["check_heads_only_s"] and 0 < row["check_s"] < row["first_call_s"] + 5
    assert "tiny" in format_table(result)


@pytest.mark.slow
def test_bench_script_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_spectral.py"), "--presets", "tiny", "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["rows"][0]["preset"] == "tiny"
