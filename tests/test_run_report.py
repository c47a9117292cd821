"""The run report (scripts/spectral_report.py): one HTML file with the loss, alerts, ESD vs null, config."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LogNorm

import trainer.run_report as run_report
from analysis.spectral.nulls import NULLS
from scripts import spectral_report
from tests.conftest import run_train


def test_report_of_a_trained_run(tmp_path: Path, corpus_cache: Path, monkeypatch) -> None:
    proc = run_train("trainer=debug", "logger=csv", "spectral.every_n_steps=3", "spectral.logit_every_n_steps=2",
                     "spectral.rules.logit_growth.max_logit=0.001",  # a WARN alert at the first logit check
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("default/*/DONE")]
    drawn = {}

    def recorded(name):
        draw = getattr(run_report, name)

        def recording(*args, **kwargs):
            drawn.setdefault(name, []).append(draw(*args, **kwargs))
            return drawn[name][-1]
        return recording

    for name in ("esd_grid", "layer_head_heatmap", "loss_with_alerts"):
        monkeypatch.setattr(run_report, name, recorded(name))
    assert spectral_report.main([str(run_dir)]) == 0
    text = (run_dir / "report.html").read_text()

    # the ESD: log axes, the product null's density on its grid at the heads' aspect r/d = 32/128
    (esd,) = drawn["esd_grid"]
    ax = esd.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    (null,) = [line for line in ax.get_lines() if line.get_label() == "null density"]
    x, y = null.get_data()
    assert np.allclose(y, NULLS["product"].density(torch.from_numpy(x), 32 / 128).numpy()) and (y > 0).all()
    assert "the product null at aspect r/d = 32/128" in text
    # the heatmap: a log colour scale and a value in every cell
    (heat,) = drawn["layer_head_heatmap"]
    assert isinstance(heat.axes[0].images[0].norm, LogNorm) and len(heat.axes[0].texts) == 4 * 4
    # loss and validation loss with the alerts marked; the alerts table holds every alert
    (loss,) = drawn["loss_with_alerts"]
    labels = [line.get_label() for line in loss.axes[0].get_lines()]
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert labels[:2] == ["train/loss", "val/loss"]
    assert {lbl.split(":")[0] for lbl in labels[2:]} == {a["level"] for a in alerts}  # a marker per level
    assert alerts and len(re.findall(r'<tr class="(INFO|WARN|ERROR)">', text)) == len(alerts)
    assert f"Alerts ({len(alerts)})" in text
    # self-contained: every figure inline, decodable PNG; the config is on the page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) >= 5 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "max_steps: 6" in text and "src=\"http" not in text


def test_report_of_a_directory_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert spectral_report.main([str(tmp_path)]) == 2
    assert "is not a qkscope run directory" in capsys.readouterr().err
