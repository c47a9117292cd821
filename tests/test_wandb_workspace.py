"""The W&B workspace built in code (wandb-workspaces) from a real offline run's keys."""

import json
from pathlib import Path

import wandb_workspaces.reports.v2 as wr

from scripts import wandb_workspace
from tests.conftest import run_train
from trainer.wandb_workspace import SPECTRAL_METRICS, build_workspace, run_keys


def test_workspace_from_a_real_run_charts_what_it_logged(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("trainer=debug", "spectral.every_n_steps=3", "spectral.logit_every_n_steps=2",
                     "spectral.image_every_n_checks=1", f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("default/*/DONE")]
    keys = run_keys(run_dir)
    workspace = build_workspace(keys, "someone", "qkscope")
    sections = {s.name: s.panels for s in workspace.sections}
    assert list(sections) == ["Loss", "Throughput and optimisation", "Spectral health: content",
                              "Heatmaps and ESDs", "Attention logits"]  # no alerts in 6 steps: no alerts section
    lines = [p for panels in sections.values() for p in panels if isinstance(p, wr.LinePlot)]
    assert all(set(p.y) <= keys and p.x in keys for p in lines)  # every charted key was logged: no empty chart
    spectral = {p.title: p.y for p in sections["Spectral health: content"] if p.title.endswith("per layer")}
    assert list(spectral) == [f"content: {m} per layer" for m in SPECTRAL_METRICS]  # one chart per metric ...
    assert all(y == [f"spectral/content/L{i}/{m}" for i in range(4)]  # ... with a line per layer
               for (title, y), m in zip(spectral.items(), SPECTRAL_METRICS, strict=True))
    assert any(p.x == "train/tokens" and p.y == ["train/loss"] for p in sections["Loss"])
    tables = [p.table_name for panels in sections.values() for p in panels if isinstance(p, wr.WeavePanelSummaryTable)]
    assert tables == ["samples", "spectral/heads"]
    media = [p.media_keys for p in sections["Heatmaps and ESDs"] if isinstance(p, wr.MediaBrowser)]
    assert media == [["spectral_images/content_esd"], ["spectral_images/content_lambda_max_over_edge"]]
    view = workspace._to_model()  # the saved-view spec W&B's server takes: built offline, nothing sent
    assert len(view.model_dump_json()) > 1000

    assert wandb_workspace.main([str(run_dir), "--entity", "someone"]) == 0
    written = json.loads((run_dir / "wandb_workspace.json").read_text())
    assert [s["name"] for s in written["sections"]] == list(sections)
