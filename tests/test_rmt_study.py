"""The seed-000 study (conf/experiment/rmt_mla.yaml, analysis/rmt_study.py, scripts/rmt_figures.py):
its numbers on hand-made histories, and its figures on a real tiny sweep of the real entry point."""

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.rmt_study import KindSeries, RunData, alert_counts, first_crossing, stats, summarize
from scripts import rmt_figures
from tests.conftest import run_train


def series(spikes: list[list[int]], eff_rank: list[list[float]]) -> KindSeries:
    """A KindSeries of checks at steps 0, 10, 20, ... with the given (S, L) spikes and ranks."""
    s = np.array(spikes, dtype=np.float64)
    return KindSeries(steps=np.arange(len(s)) * 10, ratio=1.0 + s, spikes=s, heads_spiking=(s > 0).astype(float),
                      eff_rank=np.array(eff_rank, dtype=np.float64), rank=32)


def test_numbers_on_handmade_histories() -> None:
    assert first_crossing(np.array([0, 10, 20]), np.array([[0, 0], [0, 2], [1, 0]])) == [20, 10]
    assert first_crossing(np.array([0, 10]), np.zeros((2, 1))) == [None]
    assert stats([1.0, None, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 2, "of": 3}
    assert stats([None])["mean"] is None
    assert alert_counts([{"rule": "spikes", "keys": ["L0H1", "L1H0"]}, {"rule": "spikes", "keys": ["L2H2"]},
                         {"rule": "rank_collapse", "keys": ["content/L1"]}]) == (
        {"spikes": 2, "rank_collapse": 1}, {"spikes": 3, "rank_collapse": 1})
    runs = [RunData("mha", 1, "a", "done", {"content": series([[0, 0], [1, 0], [3, 1]], [[20, 20], [10, 18], [5, 16]])},
                    alerts={"spikes": 2}, val_loss=(np.array([10, 20]), np.array([6.0, 5.0]))),
            RunData("mha", 2, "b", "done", {"content": series([[0, 0], [0, 0], [2, 0]], [[20, 20], [15, 19], [7, 18]])},
                    val_loss=(np.array([10, 20]), np.array([6.0, 5.5]))),
            RunData("mla", 1, "c", "done", {"content": series([[0, 0], [0, 0], [0, 0]], [[20, 20]] * 3)})]
    out = summarize(runs)
    assert list(out["variants"]) == ["mha", "mla"]  # seed 000's order
    mha = out["variants"]["mha"]["kinds"]["content"]
    assert [s["mean"] for s in mha["first_crossing_step"]] == [15.0, 20.0]
    assert [s["n"] for s in mha["first_crossing_step"]] == [2, 1]
    assert [s["max"] for s in mha["peak_spikes"]] == [3.0, 1.0]
    assert [s["mean"] for s in mha["final_eff_rank"]] == [6.0, 17.0]
    assert out["variants"]["mha"]["final_val_loss"]["mean"] == 5.25
    assert out["variants"]["mha"]["alerts"]["spikes"] == {"mean": 1.0, "std": 1.0, "min": 0.0, "max": 2.0,
                                                          "n": 2, "of": 2}
    assert out["variants"]["mla"]["kinds"]["content"]["first_crossing_step"][0]["n"] == 0
    assert out["variants"]["mla"]["final_val_loss"]["n"] == 0


def test_figures_of_a_real_tiny_sweep(tmp_path: Path, corpus_cache: Path) -> None:
    """The preset's own multirun, shrunk to 2 variants x 1 seed x 4 steps, then the figure script."""
    proc = run_train("experiment=rmt_mla", "attention=mha,mla", "seed=1", "trainer=debug", "trainer.max_steps=4",
                     "trainer.val_check_interval=2", "data.batch_size=4", "data.val_batches=2",
                     "module.sample_tokens=0", "spectral.every_n_steps=2", "spectral.mc_draws=200",
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "rmt_mla"
    out = tmp_path / "figures"
    assert rmt_figures.main([str(sweep), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_with_spectra"] == 2
    assert list(summary["variants"]) == ["mha", "mla"]
    for variant, entry in summary["variants"].items():
        assert entry["seeds"] == [1] and entry["status"] == ["done"]
        content = entry["kinds"]["content"]
        assert len(content["first_crossing_step"]) == len(content["final_eff_rank"]) == 4  # tiny: 4 layers
        assert 0 < content["final_eff_rank"][0]["mean"] <= content["rank"]
        assert entry["final_val_loss"]["n"] == 1 and np.isfinite(entry["final_val_loss"]["mean"])
        assert f"{variant}_content_lambda_max_over_edge.png" in summary["figures"]
    assert "rope" in summary["variants"]["mla"]["kinds"]  # decoupled RoPE: its shared rotary path too
    for run in summary["runs"]:
        assert run["kinds"]["content"]["last_step"] == 4 and run["kinds"]["content"]["checks"] == 3
    for name in summary["figures"]:
        assert (out / name).stat().st_size > 1000
    assert {"alerts.png", "val_loss.png", "eff_rank_content.png", "mha_content_spikes.png"} <= set(summary["figures"])


@pytest.mark.parametrize("argv", [["/nonexistent/sweep"]])
def test_missing_sweep_is_an_error(argv: list[str], tmp_path: Path) -> None:
    assert rmt_figures.main([*argv, "--out", str(tmp_path / "o")]) == 2
