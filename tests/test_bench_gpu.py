"""scripts/bench_gpu.py: the GPU benchmark's code path, run on CPU with --dry-run (no GPU here), and its peaks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench_gpu import peak_bf16

ROOT = Path(__file__).resolve().parents[1]


def test_peaks_are_the_datasheets_dense_bf16_and_unknown_devices_get_none() -> None:
    assert peak_bf16("NVIDIA H100 80GB HBM3")[0] == pytest.approx(1979e12 / 2, rel=1e-3)
    assert peak_bf16("NVIDIA H100 PCIe")[0] == pytest.approx(1513e12 / 2, rel=1e-3)
    assert peak_bf16("NVIDIA H200")[0] == pytest.approx(1979e12 / 2, rel=1e-3)
    assert peak_bf16("NVIDIA H200 NVL")[0] == pytest.approx(1671e12 / 2, rel=1e-3)
    assert peak_bf16("NVIDIA A100-SXM4-80GB") == (None, None)


@pytest.mark.slow
def test_dry_run_takes_every_step_of_the_gpu_benchmark_on_cpu(tmp_path: Path) -> None:
    """Both variants compiled through the real Trainer with the spectral check, the attention kernel found by the
    profiler, and the DDP child (two CPU processes): the plumbing an H100 run relies on."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_gpu", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    single = [r for r in report["rows"] if r["devices"] == 1]
    ddp = [r for r in report["rows"] if r["devices"] == 2]
    assert [r["variant"] for r in single] == [r["variant"] for r in ddp] == ["mha", "mla"]
    for r in single:
        assert r["attention_backend"] == ["flash (CPU)"] and r["mfu"] is None
        assert r["tokens_per_s"] > 0 and r["first_step_s"] > 0 and r["spectral_checks"] >= 2
    assert all(r["trainer"] == "ddp" and r["scaling"] > 0 for r in ddp)
    assert "| mla | 2 |" in proc.stdout
