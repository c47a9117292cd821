"""A saved W&B workspace for qkscope runs, built in code with W&B's `wandb-workspaces` library.

Sections: loss and validation (against steps and against tokens seen); throughput and optimisation
(tokens/s, MFU, grad-norm, lr); per QK kind one chart per spectral metric with a line per layer (not
one chart per layer and metric); the λ_max/edge heatmaps, ESD images and per-head table; alerts; attention
logits; the growing table of text samples.
The panels are built from the keys a run really logged (read from its `.wandb` file), so none is empty.

Saving a workspace needs a W&B server and an API key (`Workspace.save()`); offline, the definition
is built, checked and written as JSON.
"""

import re
from collections.abc import Iterable
from pathlib import Path

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

SPECTRAL_METRICS = ("lambda_max_over_edge", "spikes", "eff_rank", "stable_rank", "tw_z", "alpha", "ks", "overlap",
                    "spectral_norm", "sigma2")  # the per-layer scalars of callbacks/spectral_logging.report_scalars
LOGIT_METRICS = ("max_logit", "bound", "entropy_min", "entropy_mean")


def _layers(keys: set[str], pattern: str) -> list[str]:
    """The keys matching `pattern` (with one (\\d+) for the layer), in layer order."""
    found = [(int(m.group(1)), k) for k in keys if (m := re.fullmatch(pattern, k))]
    return [k for _, k in sorted(found)]


def _present(keys: set[str], wanted: Iterable[str]) -> list[str]:
    return [k for k in wanted if k in keys]


def _line(title: str, y: list[str], x: str = "trainer/global_step", log_y: bool = False) -> wr.LinePlot:
    return wr.LinePlot(title=title, x=x, y=y, log_y=log_y)


def build_workspace(keys: set[str], entity: str, project: str, name: str = "qkscope: spectral health") -> ws.Workspace:
    """The workspace for runs that logged `keys` (history keys, e.g. of one run of the sweep)."""
    sections = []
    loss = [_line("loss", _present(keys, ("train/loss", "val/loss")))]
    if "train/tokens" in keys:
        loss.append(_line("loss against tokens seen", ["train/loss"], x="train/tokens"))
    loss += [_line(k, [k]) for k in _present(keys, ("val/ppl",))]
    loss += [wr.WeavePanelSummaryTable(table_name=k) for k in _present(keys, ("samples",))]  # the growing table
    sections.append(ws.Section(name="Loss", panels=loss, is_open=True))
    speed = [_line(k, [k]) for k in _present(keys, ("train/device/items_per_sec", "train/device/mfu",
                                                    "train/grad_norm", "train/lr"))]
    if speed:
        sections.append(ws.Section(name="Throughput and optimisation", panels=speed, is_open=True))
    kinds = sorted({m.group(1) for k in keys if (m := re.fullmatch(r"spectral/(\w+)/L\d+/eff_rank", k))})
    for kind in kinds:
        panels = [_line(f"{kind}: {metric} per layer", ys, log_y=metric in ("lambda_max_over_edge", "spectral_norm"))
                  for metric in SPECTRAL_METRICS
                  if (ys := _layers(keys, rf"spectral/{kind}/L(\d+)/{metric}"))]
        panels += [_line(k, [k]) for k in _present(keys, (f"spectral/{kind}/spikes_total",
                                                          f"spectral/{kind}/heads_flagged_bh"))]
        sections.append(ws.Section(name=f"Spectral health: {kind}", panels=panels, is_open=True))
    images = sorted({k.split("/", 1)[1].split("/")[0] for k in keys if k.startswith("spectral_images/")})
    if images:
        sections.append(ws.Section(name="Heatmaps and ESDs", is_open=True, panels=[
            *[wr.MediaBrowser(title=image, media_keys=[f"spectral_images/{image}"], num_columns=1) for image in images],
            *[wr.WeavePanelSummaryTable(table_name=k) for k in _present(keys, ("spectral/heads",))]]))
    alerts = _present(keys, ("alerts/INFO", "alerts/WARN", "alerts/ERROR"))
    if alerts:
        sections.append(ws.Section(name="Alerts", panels=[_line("alerts per check", alerts)], is_open=True))
    logits = [_line(f"logits: {metric} per layer", ys, log_y=metric in ("max_logit", "bound"))
              for metric in LOGIT_METRICS if (ys := _layers(keys, rf"logits/L(\d+)/{metric}"))]
    if logits:
        sections.append(ws.Section(name="Attention logits", panels=logits, is_open=False))
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis="trainer/global_step"))


def run_keys(run_dir: str | Path) -> set[str]:
    """Every history key a run logged to W&B (all its sessions' .wandb files), W&B's own `_` keys excluded.
    A media entry (an image, a table) appears under its own key, not its parts."""
    from trainer.wandb_records import history

    keys: set[str] = set()
    for path in sorted(Path(run_dir).glob("wandb/*-run-*/run-*.wandb")):
        for row in history(path):
            for key in row:
                head = re.sub(r"/(_type|path|sha256|size|format|width|height|ncols|nrows|artifact_path|"
                              r"_latest_artifact_path|log_mode|increment_num|previous_increments_paths|"
                              r"filenames|count|captions|masks|boxes|classes)$", "", key)
                if not head.startswith("_"):
                    keys.add(head)
    return keys
