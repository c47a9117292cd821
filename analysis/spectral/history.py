"""The two histories a run keeps, each written and read here (one owner per on-disk format):

    RUN_DIR/spectra/step<N>.npz   one spectral check: per-kind (L, H) arrays (`write_check`, `load_history`)
    RUN_DIR/logits.jsonl          one JSON line per logit check (`append_logit_check`, `load_logit_history`)
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analysis.files import atomic_write
from analysis.spectral.health import HEAD_METRICS

if TYPE_CHECKING:
    from analysis.spectral.health import SpectralReport

SPECTRA_DIR = "spectra"  # names inside a run directory (trainer/run_dir.py lays the rest out)
LOGITS_FILE = "logits.jsonl"
ALERTS_FILE = "alerts.jsonl"  # one JSON record per alert, written by callbacks/spectral.py
CHECK_GLOB = "step*.npz"


def check_path(spectra_dir: str | Path, step: int) -> Path:
    """The file of the spectral check at `step`."""
    return Path(spectra_dir) / f"step{step:07d}.npz"


def check_step(path: str | Path) -> int:
    """The step a spectral check file holds, from its name."""
    return int(Path(path).stem.removeprefix("step"))


def write_check(spectra_dir: str | Path, step: int, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write one spectral check (`arrays`: "<kind>/<metric>" -> (L, H) arrays, ...) atomically, with its step."""
    path = check_path(spectra_dir, step)
    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, step=np.array(step), **arrays)
    return path


def write_report(spectra_dir: str | Path, step: int, report: "SpectralReport") -> Path:
    """One spectral check's report as a check file: every kind's eigenvalues, input dimension and per-head
    metrics (HEAD_METRICS, threshold, finite), the factor spectra and the layer sums."""
    arrays = {}
    if report.layer_sum.numel():
        arrays["layer_sum"] = report.layer_sum.numpy()
    for kind, hs in report.heads.items():
        arrays[f"{kind}/eigs"] = hs.eigs.numpy()
        arrays[f"{kind}/input_dim"] = np.array(hs.top_u.shape[-1])  # d of the d x r factors: the null's aspect r/d
        for name in (*HEAD_METRICS, "threshold", "finite"):
            arrays[f"{kind}/{name}"] = getattr(hs, name).numpy()
    for name, sv in report.factors.items():
        arrays[f"factor/{name}"] = sv.numpy()
    return write_check(spectra_dir, step, arrays)


def append_logit_check(path: str | Path, step: int, grids: Mapping[str, list[list[float]]]) -> None:
    """Append one logit check (max_logit, bound, entropy: (L, H) lists) as a JSON line, values to 6 decimals."""
    record = {"step": step, **{name: [[round(float(v), 6) for v in row] for row in grid]
                               for name, grid in grids.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class SpectralHistory:
    steps: list[int]
    checks: list[dict[str, np.ndarray]]  # one dict of arrays per checked step, in step order

    @property
    def kinds(self) -> list[str]:
        return sorted({k.split("/")[0] for k in self.checks[0] if k.endswith("/eigs")})

    def grid(self, kind: str, metric: str) -> np.ndarray:
        """(S, L, H) values of a per-head metric; 'lambda_max_over_edge' is derived."""
        if metric == "lambda_max_over_edge":
            return self.grid(kind, "lambda_max") / self.grid(kind, "edge")
        return np.stack([c[f"{kind}/{metric}"] for c in self.checks]).astype(np.float64)

    def per_layer(self, kind: str, metric: str, reduce: str) -> np.ndarray:
        """(S, L): the metric reduced over heads with nanmax | nansum | nanmean."""
        fn = {"max": np.nanmax, "sum": np.nansum, "mean": np.nanmean}[reduce]
        return fn(self.grid(kind, metric), axis=2)

    def latest(self, kind: str) -> dict[str, np.ndarray]:
        return {k.split("/", 1)[1]: v for k, v in self.checks[-1].items() if k.startswith(f"{kind}/")}


def load_history(spectra_dir: str | Path) -> SpectralHistory:
    """All checks under `spectra_dir`, sorted by step."""
    files = sorted(Path(spectra_dir).glob(CHECK_GLOB))
    if not files:
        raise FileNotFoundError(f"no spectral history (step*.npz) in {spectra_dir}")
    checks = [dict(np.load(f)) for f in files]
    return SpectralHistory(steps=[int(c["step"]) for c in checks], checks=checks)


@dataclass
class LogitHistory:
    """The logit checks a run wrote to RUN_DIR/logits.jsonl: per check, per layer and head."""

    steps: np.ndarray  # (S,)
    max_logit: np.ndarray  # (S, L, H) measured max |logit| on the probe batch
    bound: np.ndarray  # (S, L, H) weight-only bound
    entropy: np.ndarray  # (S, L, H) mean attention entropy, nats


def load_logit_history(path: str | Path) -> LogitHistory:
    """Read logits.jsonl (one JSON record per logit check), sorted by step; a repeated step keeps its last record."""
    records = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[int(record["step"])] = record
    if not records:
        raise FileNotFoundError(f"no logit checks in {path}")
    steps = sorted(records)
    grid = {name: np.array([records[s][name] for s in steps], dtype=np.float64)
            for name in ("max_logit", "bound", "entropy")}
    return LogitHistory(steps=np.array(steps), **grid)
