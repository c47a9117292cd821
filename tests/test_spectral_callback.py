"""The spectral health callback in real training runs, read back from offline W&B and the run dir."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.spectral.logits import LogitStats
from callbacks.spectral import SpectralHealthCallback
from models import GPT, GPTConfig
from tests.conftest import CONF, run_train, wandb_files
from tests.spectral_hooks import PlantSpike
from trainer.wandb_records import alerts, history

SPECTRAL_FAST = ("spectral.every_n_steps=2", "spectral.mc_draws=200", "spectral.image_every_n_checks=2",
                 "callbacks.throughput.window_size=2")


def only_run_dir(root: Path) -> Path:
    (run_dir,) = [p.parent for p in root.glob("default/*/.hydra")]
    return run_dir


def test_planted_spike_raises_alert_logged_to_wandb(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("trainer=debug", *SPECTRAL_FAST, "+callbacks.plant._target_=tests.spectral_hooks.PlantSpike",
                     "+callbacks.plant.layer=1", "+callbacks.plant.head=2",
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)

    records = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    spikes = [r for r in records if r["rule"] == "spikes"]
    assert spikes and "content:L1H2" in spikes[0]["keys"]
    console = [line for line in (proc.stdout + proc.stderr).splitlines() if "[spectral " in line]
    assert any("[spectral INFO] spikes at step 4: 1 key (content:L1H2)" in line for line in console)
    assert console and all(len(line) < 240 for line in console)  # one line each; the details are in alerts.jsonl
    assert all(key == "content:L1H2" for r in spikes for key in r["keys"])  # no false alarm elsewhere
    assert spikes[0]["step"] == 4  # k=2 of K=3 checks: steps 2 and 4 (the step-0 check predates the plant)

    (wandb_file,) = wandb_files(run_dir)
    logged = alerts(wandb_file)
    assert any(a["title"].startswith("qkscope: Spectral spike") and "L1H2" in a["text"] for a in logged)
    rows = history(wandb_file)
    keys = {k for r in rows for k in r}
    for layer in range(4):
        assert f"spectral/content/L{layer}/lambda_max_over_edge" in keys
        assert f"spectral_esd/content/L{layer}/_type" in keys or f"spectral_esd/content/L{layer}" in keys
    assert "spectral/content/spikes_total" in keys and "spectral/check_seconds" in keys
    assert any(k.startswith("spectral_images/content_esd") for k in keys)
    image_steps = {r.get("trainer/global_step") for r in rows if any(k.startswith("spectral_images/content_esd")
                                                                      for k in r)}
    assert image_steps == {0, 4, 6}  # every 2nd check (steps 0, 4) and the last one
    assert any(k.startswith("spectral/heads") for k in keys)  # the per-head table
    spikes = [r["spectral/content/L1/spikes"] for r in rows if "spectral/content/L1/spikes" in r]
    ratio = [r["spectral/content/L1/lambda_max_over_edge"] for r in rows
             if "spectral/content/L1/lambda_max_over_edge" in r]
    assert spikes[0] == 0 and spikes[-1] >= 1  # the step-0 check predates the plant
    assert ratio[-1] > 2 * ratio[0]

    history_files = sorted((run_dir / "spectra").glob("step*.npz"))
    assert [int(np.load(f)["step"]) for f in history_files] == [0, 2, 4, 6]
    last = np.load(history_files[-1])
    assert last["content/eigs"].shape == (4, 4, 32) and last["content/num_spikes"][1, 2] >= 1


def test_nan_weight_gives_error_alert_checkpoint_and_stop(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("trainer=debug", "trainer.max_steps=12", *SPECTRAL_FAST,
                     "+callbacks.nan._target_=tests.spectral_hooks.PlantNaN", "+callbacks.nan.step=3",
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 3, proc.stderr[-3000:]  # an alert, not a crash; stopped early, so not success
    run_dir = only_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    errors = [r for r in records if r["level"] == "ERROR"]
    assert errors and errors[0]["rule"] == "non_finite" and errors[0]["step"] == 4
    assert (run_dir / "checkpoints" / "alert-step0000004.ckpt").exists()
    assert not (run_dir / "DONE").exists()  # stopped by the alert action, resumable
    (wandb_file,) = wandb_files(run_dir)
    assert any(a["level"] == "ERROR" and "non-finite" in a["text"] for a in alerts(wandb_file))


def test_state_round_trip_does_not_refire(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, d_model=64, n_head=4))
    PlantSpike(layer=0, head=0, strength=4.0).on_train_start(None, SimpleNamespace(model=model))

    def callback() -> SpectralHealthCallback:
        return SpectralHealthCallback(every_n_steps=1, mc_draws=200, rules={"spikes": {"k": 1, "K": 1}},
                                      cache_dir=str(tmp_path / "nulls"))

    first = callback()
    report = first.analyzer.analyze(model.qk_factors())
    fired = first._evaluate("spectral", report, 1, first.checks)
    assert [a.rule for a in fired].count("spikes") == 1
    first.checks += 1
    state = first.state_dict()

    resumed = callback()
    resumed.load_state_dict(state)
    refired = resumed._evaluate("spectral", resumed.analyzer.analyze(model.qk_factors()), 2, resumed.checks)
    assert "spikes" not in [a.rule for a in refired]  # within the cool-down: not fired again
    assert resumed.checks == 1 and resumed.persistence["spikes"].last_fired == {"content:L0H0": 0}


def test_rule_start_step_ignores_the_warmup_phase(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, d_model=64, n_head=4))
    rules = {"runaway_norm": {"start_step": 30, "growth": 4.0, "window": 1, "k": 1, "K": 1}}
    cb = SpectralHealthCallback(every_n_steps=10, mc_draws=200, rules=rules, cache_dir=str(tmp_path / "nulls"))

    def grow_and_check(step: int) -> list[str]:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.q_proj.weight.mul_(5.0)  # W_Q W_K^T and its spectral norm grow 5x per check
        fired = cb._evaluate("spectral", cb.analyzer.analyze(model.qk_factors()), step, cb.checks)
        cb.checks += 1
        return [a.rule for a in fired]

    assert grow_and_check(10) == [] and grow_and_check(20) == []  # before start_step: not evaluated
    assert cb.rule_memory["runaway_norm"] == {}
    assert grow_and_check(30) == []  # first evaluated check: nothing to compare with yet
    assert grow_and_check(40) == ["runaway_norm"]  # 5x > growth 4x over one check


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"every_n_steps": 0}, "spectral.every_n_steps=0"), ({"rules": {"nope": {}}}, "spectral.rules.nope"),
     ({"actions": {"WARN": ["explode"]}}, r"allowed: \['log', 'checkpoint', 'stop', 'qk_clip'\]"),
     ({"logit_every_n_steps": 0}, "spectral.logit_every_n_steps=0"),
     ({"null_model": "gauss"}, r"spectral.null_model='gauss' is invalid; allowed: \['mp', 'product'")],
)
def test_bad_callback_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpectralHealthCallback(**kwargs)


def test_logit_growth_rule_thresholds_and_growth() -> None:
    """max_logit and bound thresholds, and growth of the bound over `window` checks once above `floor`."""
    cb = SpectralHealthCallback(rules={"logit_growth": {"k": 1, "K": 1, "cooldown": 0, "window": 2}})

    def check(max_logit: float, bound: float) -> list[str]:
        stats = LogitStats(max_logit=torch.tensor([[1.0, max_logit]]), entropy=torch.ones(1, 2),
                           bound=torch.tensor([[1.0, bound]]))
        fired = cb._evaluate("logits", stats, cb.logit_checks, cb.logit_checks)
        cb.logit_checks += 1
        return [a.text for a in fired]

    assert check(10, 50) == [] and check(10, 90) == []  # below every threshold, no growth window yet
    assert check(10, 500) == ["step 2: layer 0: bound grew 50 -> 500 in 2 checks"]
    assert check(60, 500) == ["step 3: layer 0: max logit 60 > 50"]
    assert check(10, 2000) == ["step 4: layer 0: logit bound 2e+03 > 1000"]
    assert check(10, 120) == []  # 120 < 8 x 500


LOGIT_FAST = ("spectral.every_n_steps=3", "spectral.mc_draws=200", "spectral.logit_every_n_steps=1",
              "callbacks.throughput.window_size=2")


def test_planted_logit_blowup_warns_and_the_qk_clip_action_brings_it_back(tmp_path: Path, corpus_cache: Path) -> None:
    """Layer 1's logits x900 before step 2: logit_growth WARNs at the check of step 2 (k=1), nothing WARNs
    before, and the qk_clip action clips the layer to tau from then on."""
    proc = run_train("trainer=debug", "logger=csv", *LOGIT_FAST,
                     "+callbacks.plant._target_=tests.spectral_hooks.PlantLogitBlowup", "+callbacks.plant.step=1",
                     "+callbacks.plant.layer=1", "spectral.actions.WARN=[log,qk_clip]", "spectral.qk_clip_tau=20",
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    warns = [r for r in records if r["level"] == "WARN"]
    assert [(r["rule"], r["step"], r["keys"]) for r in warns] == [("logit_growth", 2, ["L1"])]
    checks = [json.loads(line) for line in (run_dir / "logits.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 1, 2, 3, 4, 5, 6]
    layer1 = {c["step"]: max(c["max_logit"][1]) for c in checks}
    assert layer1[0] < 5 and layer1[2] > 100  # planted before step 2's update
    assert all(layer1[s] <= 20 * 1.05 for s in (3, 4, 5, 6))  # clipped at 2; each update moves it a little
    for c in checks:  # the bound holds at every check
        assert all(m <= b * (1 + 1e-5) for rm, rb in zip(c["max_logit"], c["bound"], strict=True)
                   for m, b in zip(rm, rb, strict=True))


def test_qk_clip_callback_keeps_every_head_at_tau_in_a_real_run(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("trainer=debug", "logger=csv", *LOGIT_FAST, "qk_clip=on", "qk_clip.tau=5",
                     "+callbacks.plant._target_=tests.spectral_hooks.PlantLogitBlowup", "+callbacks.plant.step=1",
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    checks = {c["step"]: c for c in map(json.loads, (run_dir / "logits.jsonl").read_text().splitlines())}
    for step in range(1, 7):  # the spectral callback measures after the clip of the same step
        assert max(map(max, checks[step]["max_logit"])) <= 5 * (1 + 1e-4)
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "qk_clip/heads_clipped" in metrics and "train/grad_norm" in metrics


def test_the_shipped_yaml_and_the_callbacks_defaults_agree() -> None:
    """One set of defaults: the callback built with no arguments checks exactly what conf/spectral/default.yaml
    configures (rules, persistence, start steps, actions and every literal scalar)."""
    import inspect

    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "spectral" / "default.yaml"), resolve=False)
    from_yaml = SpectralHealthCallback(rules=yaml["rules"], actions=yaml["actions"])
    bare = SpectralHealthCallback()
    assert {n: vars(r) for n, r in bare.rules.items()} == {n: vars(r) for n, r in from_yaml.rules.items()}
    assert {n: (p.k, p.K, p.cooldown) for n, p in bare.persistence.items()} == {
        n: (p.k, p.K, p.cooldown) for n, p in from_yaml.persistence.items()}
    assert bare.start_steps == from_yaml.start_steps and bare.actions == from_yaml.actions
    params = inspect.signature(SpectralHealthCallback.__init__).parameters
    literal = {k: v for k, v in yaml.items() if k in params and not (isinstance(v, str) and "${" in v)
               and k not in ("rules", "actions")}
    assert literal and {k: params[k].default for k in literal} == literal


def test_console_line_names_the_worst_keys_first() -> None:
    from callbacks.spectral_rules import Alert

    keys = [f"content:L{i // 4}H{i % 4}" for i in range(16)]
    worst = ["content:L3H1", "content:L0H2", "content:L2H0", *[k for k in keys if k not in
                                                              ("content:L3H1", "content:L0H2", "content:L2H0")]]
    alert = Alert("spikes", "INFO", "qkscope: t", "x" * 2000, 100, keys, worst)
    line = alert.summary()
    assert line == ("[spectral INFO] spikes at step 100: 16 keys (content:L3H1, content:L0H2, content:L2H0 +13 more); "
                    "details in alerts.jsonl")
