"""The alerts benchmark's labels and scores, on loss curves whose answer is known."""

import math

import numpy as np

from analysis.study.alert_bench import Label, RunRecord, label_run, loss_spike, score


def record(loss: list[float], final_val: float, alerts: list[dict] | None = None) -> RunRecord:
    steps = np.arange(len(loss)) * 10
    return RunRecord(name="r", steps=steps, train_loss=np.array(loss, dtype=float), grad_steps=steps,
                     grad_norm=np.ones(len(loss)), final_val=final_val, alerts=alerts or [],
                     logit_steps=steps, max_logit=np.ones(len(loss)), bound=np.ones(len(loss)))


DECAY = [7.6, 7.0, 6.4, 6.0, 5.6, 5.3, 5.1, 4.9, 4.8, 4.7]


def test_labels() -> None:
    best = record(DECAY, 4.7)
    assert label_run(record(DECAY, 4.72), best) == Label("healthy", None, "")
    nan = label_run(record([*DECAY[:5], math.nan, *DECAY[6:]], 4.7), best)
    assert (nan.label, nan.fail_step) == ("diverged", 50)
    spike = label_run(record([*DECAY[:4], 7.5, 7.6, 7.5, 7.6, 7.5, 7.6], 6.0), best)
    assert spike.label == "damaged" and spike.fail_step == 50  # smoothed: 3 points 0.5 above the minimum
    plateau = label_run(record([7.6, 7.0, 6.4, 6.0, 6.0, 6.0, 5.9, 5.6, 5.5, 5.4], 5.4), best)
    assert plateau.label == "damaged" and plateau.fail_step == 50  # from step 50 on 0.25 above the best run


def test_score_counts_warned_false_alarms_and_claims() -> None:
    labels = {"ok": Label("healthy", None, ""), "bad": Label("damaged", 100, ""),
              "late": Label("damaged", 50, ""), "other": Label("damaged", 80, "")}
    s = score("d", {"ok": None, "bad": 20, "late": 60, "other": 10}, labels, {"other"})
    assert (s.warned, s.failing, s.false_alarms, s.healthy, s.claims_other, s.other) == (1, 2, 0, 1, 1, 1)
    assert s.median_lead == 0.8
    assert loss_spike(record(DECAY, 4.7)) is None
    assert loss_spike(record([*DECAY[:5], 6.0, *DECAY[6:]], 4.7)) == 50
