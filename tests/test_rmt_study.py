"""The seed-000 study (conf/experiment/rmt_mla.yaml, analysis/study/rmt_study.py, scripts/rmt_figures.py):
its numbers on hand-made histories, and its figures on a real tiny sweep of the real entry point."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from analysis.study.rmt_study import (
    VARIANT_LABELS,
    KindSeries,
    RunData,
    alert_counts,
    alerts_figure,
    eff_rank_figure,
    entropy_figure,
    first_crossing,
    markdown_table,
    seed_mean_heatmaps,
    stats,
    summarize,
    val_loss_figure,
)
from scripts import rmt_figures
from tests.conftest import run_train
from tests.png_checks import assert_png_of
from trainer.run_results import sweep_jobs


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
    table = markdown_table(out).splitlines()
    assert table[0] == "| | MHA | MLA (decoupled RoPE) |"
    assert table[2] == "| seeds | 1, 2 | 1 |"
    runs[2].status = "incomplete"  # a run still training is named so: its last check is not its end
    assert markdown_table(summarize(runs)).splitlines()[2] == "| seeds | 1, 2 | 1 (incomplete) |"
    assert "| [content] first crossing step per layer | 15 / 20 (1/2) | never / never |" in table
    assert "| final val loss | 5.250 [5.000, 5.500] | - |" in table
    assert "| alerts/run: spikes | 1.0 [0.0, 2.0] | 0 |" in table


def test_figures_of_a_real_tiny_sweep(tmp_path: Path, corpus_cache: Path) -> None:
    """The preset's own multirun, shrunk to 2 variants x 1 seed x 4 steps, then the figure script."""
    proc = run_train("experiment=rmt_mla", "attention=mha,mla", "seed=1", "trainer=debug", "trainer.max_steps=4",
                     "trainer.val_check_interval=2", "data.batch_size=4", "data.val_batches=2",
                     "module.sample_tokens=0", "spectral.every_n_steps=2", "spectral.mc_draws=200",
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
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
        assert set(entry["kinds"]) >= {"content", "activation"}  # the weight form and the activation form
        activation_rank = entry["kinds"]["activation"]["rank"]  # d of q_h, k_h: 32 for MHA, MLA's dn + dr
        assert activation_rank == 32 if variant == "mha" else activation_rank >= content["rank"]
        entropy = entry["final_attention_entropy"]
        assert len(entropy) == 4 and all(0 < e["mean"] <= np.log(128) for e in entropy)
    assert "rope" in summary["variants"]["mla"]["kinds"]  # decoupled RoPE: its shared rotary path too
    for run in summary["runs"]:
        assert run["kinds"]["content"]["last_step"] == 4 and run["kinds"]["content"]["checks"] == 3
    for name in summary["figures"]:
        assert (out / name).stat().st_size > 1000
    assert {"alerts.png", "val_loss.png", "eff_rank_content.png", "mha_content_spikes.png"} <= set(summary["figures"])

    # each PNG is a real image and, pixel for pixel, the figure of the sweep's data drawn again from its job directories
    runs = [rmt_figures.load_run(job) for job in sweep_jobs(sweep)]
    kinds = {"content", "rope", "activation"}
    figures = {name: fig for kind in sorted(kinds) for name, fig in seed_mean_heatmaps(runs, kind).items()}
    figures |= {f"eff_rank_{kind}": eff_rank_figure(runs, kind) for kind in sorted(kinds)}
    figures |= {"alerts": alerts_figure(runs), "val_loss": val_loss_figure(runs),
                "attention_entropy": entropy_figure(runs)}
    assert sorted(f"{name}.png" for name in figures) == summary["figures"]
    # ... and what they plot is what the jobs wrote: spectra/step*.npz, alerts.jsonl, csv/metrics.csv
    rules = sorted({json.loads(line)["rule"] for job in sweep_jobs(sweep) if (job / "alerts.jsonl").exists()
                    for line in (job / "alerts.jsonl").read_text().splitlines()}) or ["(none)"]
    alerts_ax = figures["alerts"].axes[0]
    assert [t.get_text() for t in alerts_ax.get_xticklabels()] == rules
    for job in sweep_jobs(sweep):
        variant = OmegaConf.load(job / ".hydra" / "config.yaml").model.attention.name
        label = VARIANT_LABELS[variant]
        checks = [{k: v.astype(np.float64) for k, v in np.load(f).items()}
                  for f in sorted((job / "spectra").glob("step*.npz"))]
        assert [int(c["step"]) for c in checks] == [0, 2, 4]
        for c in checks:  # the activation form of every head: (L, H, d_qk) eigenvalues, all finite
            assert c["activation/eigs"].shape[:2] == c["content/eigs"].shape[:2]
            assert np.isfinite(c["activation/eigs"]).all() and c["activation/finite"].all()
        last = json.loads((job / "logits.jsonl").read_text().splitlines()[-1])
        (bars,) = [b for b in figures["attention_entropy"].axes[0].containers if b.get_label().startswith(label)]
        np.testing.assert_allclose([b.get_height() for b in bars], np.mean(last["entropy"], axis=1), rtol=1e-9)
        ratio = np.stack([np.nanmax(c["content/lambda_max"] / c["content/edge"], axis=1) for c in checks])  # (S, L)
        spikes = np.stack([np.nansum(c["content/num_spikes"], axis=1) for c in checks])
        eff_rank = np.stack([np.nanmean(c["content/eff_rank"], axis=1) for c in checks])
        for metric, values in (("lambda_max_over_edge", ratio), ("spikes", spikes)):
            heatmap = figures[f"{variant}_content_{metric}"].axes[0].images[0]
            np.testing.assert_allclose(heatmap.get_array(), values.T, rtol=1e-9)  # (layer, step)
        for layer, ax in enumerate(figures["eff_rank_content"].axes[:4]):
            (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith(f"{label} (r=")]
            np.testing.assert_array_equal(line.get_xdata(), [0, 2, 4])
            np.testing.assert_allclose(line.get_ydata(), eff_rank[:, layer], rtol=1e-9)
        with open(job / "csv" / "metrics.csv", newline="") as f:
            val = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]
        assert len(val) == 2  # trainer.val_check_interval=2 of 4 steps
        (line,) = [ln for ln in figures["val_loss"].axes[0].get_lines() if ln.get_label() == f"{label} (1 seeds)"]
        np.testing.assert_allclose(np.column_stack(line.get_data()), val, rtol=1e-6)
        alerts = job / "alerts.jsonl"
        counts = Counter(json.loads(x)["rule"] for x in alerts.read_text().splitlines()) if alerts.exists() else {}
        (bars,) = [c for c in alerts_ax.containers if c.get_label() == label]
        assert [b.get_height() for b in bars] == [counts.get(rule, 0) for rule in rules]
    for name, fig in figures.items():
        assert_png_of(out / f"{name}.png", fig, dpi=90)


@pytest.mark.parametrize("argv", [["/nonexistent/sweep"]])
def test_missing_sweep_is_an_error(argv: list[str], tmp_path: Path) -> None:
    assert rmt_figures.main([*argv, "--out", str(tmp_path / "o")]) == 2
