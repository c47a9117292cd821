"""The alerts benchmark's judgement: which runs went wrong (from their loss alone) and who said so first.

A run is labelled from its loss curves, never from an alert, so the alerts can be scored against
the labels (scripts/bench_alerts.py runs the runs; docs/alerts.md states the definitions):

- diverged: the train loss is not finite at some logged step (that step);
- damaged: the smoothed train loss stays `jump` nats above its own running minimum for
  `patience` logged points (the first of them), or the final val loss is `margin` nats worse
  than the best final val loss of the same variant's learning rates; the step is then the first
  logged step from which the smoothed train loss stays `margin` above that best run's;
- healthy: neither.

A detector "warns" a failing run when it fires strictly before the run's failure step; its lead
is (failure step − first fire) / failure step. On a healthy run any fire is a false alarm.
"""

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.spectral.history import ALERTS_FILE, LOGITS_FILE


@dataclass
class RunRecord:
    """What the benchmark reads of one finished run directory."""

    name: str
    steps: np.ndarray  # (n,) logged steps of the train loss
    train_loss: np.ndarray  # (n,)
    grad_steps: np.ndarray  # (m,) logged steps of the gradient norm
    grad_norm: np.ndarray  # (m,)
    final_val: float  # val loss of the last validation
    alerts: list[dict]  # alerts.jsonl records
    logit_steps: np.ndarray  # (k,) steps of the logit checks
    max_logit: np.ndarray  # (k,) max over layers and heads of the measured max logit
    bound: np.ndarray  # (k,) max over layers and heads of the weight-only bound


def _column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a CSV metric, the last row of a repeated step winning (a resumed run)."""
    values: dict[int, float] = {}
    for row in rows:
        if row.get(key) not in (None, ""):
            values[int(row["step"])] = float(row[key])
    steps = np.array(sorted(values), dtype=np.int64)
    return steps, np.array([values[s] for s in steps], dtype=np.float64)


def load_run(run_dir: str | Path, name: str) -> RunRecord:
    """Read csv/metrics.csv, alerts.jsonl and logits.jsonl of a run directory."""
    run_dir = Path(run_dir)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps, train = _column(rows, "train/loss")
    grad_steps, grad = _column(rows, "train/grad_norm")
    _, val = _column(rows, "val/loss")
    alerts_file, logits_file = run_dir / ALERTS_FILE, run_dir / LOGITS_FILE
    alerts = [json.loads(line) for line in alerts_file.read_text().splitlines()] if alerts_file.exists() else []
    logits = [json.loads(line) for line in logits_file.read_text().splitlines()] if logits_file.exists() else []
    return RunRecord(
        name=name, steps=steps, train_loss=train, grad_steps=grad_steps, grad_norm=grad,
        final_val=float(val[-1]) if val.size else math.nan, alerts=alerts,
        logit_steps=np.array([r["step"] for r in logits], dtype=np.int64),
        max_logit=np.array([np.max(r["max_logit"]) for r in logits], dtype=np.float64),
        bound=np.array([np.max(r["bound"]) for r in logits], dtype=np.float64),
    )


def smooth(x: np.ndarray, width: int = 3) -> np.ndarray:
    """Trailing mean over `width` points (fewer at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - width, 0)
    return (c[idx] - c[lo]) / (idx - lo)


@dataclass
class Label:
    label: str  # healthy | damaged | diverged
    fail_step: int | None  # step at which the run became so (None when healthy)
    reason: str


def label_run(run: RunRecord, best: RunRecord, margin: float = 0.25, jump: float = 0.5,
              patience: int = 3) -> Label:
    """The run's label from its loss curves and those of `best`, its variant's best learning rate."""
    bad = ~np.isfinite(run.train_loss)
    if bad.any() or not math.isfinite(run.final_val):
        step = int(run.steps[bad.argmax()]) if bad.any() else int(run.steps[-1])
        return Label("diverged", step, "train loss not finite" if bad.any() else "val loss not finite")
    s = smooth(run.train_loss)
    above = s > np.minimum.accumulate(s) + jump
    for i in range(above.size - patience + 1):
        if above[i : i + patience].all():
            return Label("damaged", int(run.steps[i]), f"train loss {jump} nats above its running minimum")
    if run.final_val > best.final_val + margin:
        ref = np.interp(run.steps, best.steps, smooth(best.train_loss))
        worse = s > ref + margin
        stays = np.flip(np.logical_and.accumulate(np.flip(worse)))  # worse from here to the end
        step = int(run.steps[stays.argmax()]) if stays.any() else int(run.steps[-1])
        return Label("damaged", step, f"final val loss {run.final_val:.2f} > best {best.final_val:.2f} + {margin}")
    return Label("healthy", None, "")


def first_alert(run: RunRecord, rule: str | None = None, levels: tuple[str, ...] = ("WARN", "ERROR")) -> int | None:
    """Step of the run's first alert of `rule` (any rule when None) at one of `levels`."""
    steps = [a["step"] for a in run.alerts if (rule is None or a["rule"] == rule) and a["level"] in levels]
    return min(steps) if steps else None


def first_rule_fire(run: RunRecord, rule: str) -> int | None:
    """Step of the first alert of `rule` at any level (to score INFO rules as if they warned)."""
    return first_alert(run, rule, ("INFO", "WARN", "ERROR"))


def loss_spike(run: RunRecord, jump: float = 0.3, lookback: int = 5) -> int | None:
    """Baseline: first logged step whose train loss exceeds the minimum of the `lookback` before it by `jump`."""
    x = run.train_loss
    for i in range(1, x.size):
        if not np.isfinite(x[i]) or x[i] > x[max(0, i - lookback) : i].min() + jump:
            return int(run.steps[i])
    return None


def grad_spike(run: RunRecord, factor: float = 10.0, warmup_points: int = 5) -> int | None:
    """Baseline: first logged step whose gradient norm exceeds `factor` x the median of all before it."""
    g = run.grad_norm
    for i in range(warmup_points, g.size):
        if not np.isfinite(g[i]) or g[i] > factor * np.median(g[:i]):
            return int(run.grad_steps[i])
    return None


def early_logit(run: RunRecord, step: int, threshold: float) -> int | None:
    """Baseline (Wortsman et al. 2023): the measured max logit at one fixed early step above `threshold`."""
    hit = np.nonzero(run.logit_steps == step)[0]
    if hit.size and run.max_logit[hit[0]] > threshold:
        return step
    return None


@dataclass
class Score:
    """A detector over the benchmark's runs."""

    detector: str
    warned: int  # failing runs fired on before their failure step
    failing: int
    false_alarms: int  # healthy runs fired on
    healthy: int
    median_lead: float | None  # median over warned runs of (fail − fire) / fail
    claims_other: int  # runs failing for a reason that is not attention logit growth, fired on
    other: int

    @property
    def recall(self) -> float:
        return self.warned / self.failing if self.failing else math.nan


def score(detector: str, fires: dict[str, int | None], labels: dict[str, Label], other: set[str]) -> Score:
    """Score one detector's first-fire steps against the labels; `other` names the non-QK failures."""
    leads, warned, failing, fa, healthy, claims = [], 0, 0, 0, 0, 0
    for name, label in labels.items():
        fire = fires.get(name)
        if name in other:
            claims += fire is not None
            continue
        if label.label == "healthy":
            healthy += 1
            fa += fire is not None
            continue
        failing += 1
        if fire is not None and fire < label.fail_step:
            warned += 1
            leads.append((label.fail_step - fire) / label.fail_step)
    lead = float(np.median(leads)) if leads else None
    n_other = sum(name in other for name in labels)
    return Score(detector, warned, failing, fa, healthy, lead, claims, n_other)
