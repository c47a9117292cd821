"""The real entry point end to end: fit, W&B offline records, DONE, kill and resume."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, run_train, train_cmd, wandb_files
from trainer.run_dir import run_id_from_overrides
from trainer.wandb_records import history, metric_summaries, read_records, run_config, run_id, run_record


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_fit_logs_to_wandb_offline_and_marks_done(tmp_path: Path, corpus_cache: Path) -> None:
    args = ("trainer=debug", "callbacks.throughput.window_size=2", "logger.wandb.log_model=true",
            f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    proc = run_train(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "default" / "callbacks.throughput.window_size=2,logger.wandb.log_model=true,trainer=debug"
    assert (run_dir / "DONE").exists()
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 6
    (wandb_file,) = wandb_files(run_dir)
    assert run_id(wandb_file) == (run_dir / "wandb_run_id").read_text().strip()
    rows = history(wandb_file)
    keys = {k for r in rows for k in r}
    assert {"train/loss", "val/loss", "val/ppl", "train/device/items_per_sec", "trainer/global_step"} <= keys
    samples = [r for r in rows if "samples/_type" in r]  # one table of generated text, grown at each validation
    assert [(r["samples/_type"], r["samples/increment_num"], r["samples/nrows"]) for r in samples] == [
        ("incremental-table-file", 0, 1), ("incremental-table-file", 1, 2)]
    tokens = [(r["trainer/global_step"], r["train/tokens"]) for r in rows if "train/tokens" in r]
    assert tokens == [(step, (step + 1) * 32 * 128) for step in range(6)]  # tokens seen, in the loss's rows
    assert all("train/loss" in r for r in rows if "train/tokens" in r)  # so W&B can plot loss against tokens
    models = [rec.artifact for rec in read_records(wandb_file) if rec.WhichOneof("record_type") == "artifact"
              and rec.artifact.type == "model"]  # logger.wandb.log_model=true: the checkpoints as artifacts
    assert {Path(m.path).name for a in models for m in a.manifest.contents} == {"model.ckpt"} and len(models) == 2
    rates = [(r["train/device/items_per_sec"], r["train/device/samples_per_sec"]) for r in rows
             if "train/device/items_per_sec" in r]
    assert rates and all(abs(i - 128 * s) <= 1e-6 * i for i, s in rates)  # items are tokens: samples x block
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) == 2 and all(0 < v < 8 for v in val)
    assert list(run_record(wandb_file).tags) == ["mha", "4x128"]  # the variant and the size, to filter by
    config = run_config(wandb_file)  # the resolved config, logged once: the module's hparams do not overwrite it
    assert config["model"]["d_ff"] == 0 and config["trainer"]["max_steps"] == 6
    assert config["model"]["attention"]["name"] == "mha" and config["optim"]["lr"] > 0
    assert "min" in metric_summaries(wandb_file)["val/loss"]  # the run's summary keeps the best val/loss

    assert "trainer.max_steps=6 <= optim.warmup_steps=100: the run ends inside its warmup" in proc.stdout + proc.stderr
    again = run_train(*args)  # a finished run is not retrained
    assert again.returncode == 0 and "is DONE at step 6; nothing to do" in again.stderr + again.stdout
    assert len(wandb_files(run_dir)) == 1


def test_override_model_and_attention(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("model=small", "attention=gqa", "trainer=debug", "trainer.max_steps=3", "logger=csv",
                     f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "default" / "attention=gqa,logger=csv,model=small,trainer.max_steps=3,trainer=debug"
    assert (run_dir / "DONE").exists() and (run_dir / "csv" / "metrics.csv").exists()
    hparams = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["model"]["n_layer"] == 6 and hparams["model"]["attention"]["n_kv_head"] == 2


def test_killed_run_resumes_with_same_wandb_id(tmp_path: Path, corpus_cache: Path) -> None:
    args = ("trainer=debug", "trainer.max_steps=24", "trainer.val_check_interval=12", "data.batch_size=8",
            "callbacks.last_checkpoint.every_n_train_steps=4", f"paths.root={tmp_path}",
            f"paths.cache_dir={corpus_cache}")
    run_dir = tmp_path / "default" / run_id_from_overrides(",".join(sorted(a for a in args if "paths." not in a)))
    last = run_dir / "checkpoints" / "last.ckpt"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(train_cmd(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if checkpoint_step(last) >= 8:
                break
        except (FileNotFoundError, RuntimeError, EOFError):  # not written yet, or mid-write
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, W&B's service included
    proc.wait()
    killed_at = checkpoint_step(last)
    assert 8 <= killed_at < 24 and not (run_dir / "DONE").exists()
    first_id = (run_dir / "wandb_run_id").read_text().strip()

    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume from {last}" in resumed.stdout + resumed.stderr
    assert (run_dir / "DONE").exists() and checkpoint_step(last) == 24
    files = wandb_files(run_dir)
    assert len(files) == 2 and {run_id(f) for f in files} == {first_id}
    steps = [r["trainer/global_step"] for r in history(files[1]) if "train/loss" in r]
    assert steps and min(steps) >= killed_at  # the second session continued, it did not restart


VARIANTS = {"mha": {"content"}, "gqa": {"content"}, "mla": {"content", "rope"}, "mla_prerope": {"content"},
            "kv_shift": {"content"}, "mla_kv_shift": {"content", "rope"}}


def test_every_variant_trains_through_the_entry_point_with_spectral_checks(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("-m", f"attention={','.join(VARIANTS)}", "trainer=debug", "trainer.max_steps=4", "logger=csv",
                     "data.val_batches=2", "spectral.every_n_steps=2", f"paths.root={tmp_path}",
                     f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, kinds in VARIANTS.items():
        (run_dir,) = (tmp_path / "default").glob(f"attention={name},*")
        assert (run_dir / "DONE").exists()
        checks = sorted((run_dir / "spectra").glob("step*.npz"))
        assert [int(np.load(f)["step"]) for f in checks] == [0, 2, 4]
        init = np.load(checks[0])
        assert {k.split("/")[0] for k in init.files if k.endswith("/eigs")} == kinds
        for kind in kinds:
            pvalue = init[f"{kind}/pvalue"]  # the variant's default null (product, or rotation for MLA) at init:
            assert (pvalue < 0.01 / pvalue.size).sum() == 0, (name, kind)  # no head beyond it at the alert level
            assert np.isfinite(init[f"{kind}/eigs"]).all()
        columns = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert "spectral/content/L0/lambda_max_over_edge" in columns and "val/loss" in columns
        if "kv_shift" in name:  # the shift weights reach the logs through the probe's meta
            assert any(c.startswith("spectral/meta/L0/content/alpha1") for c in columns)


def test_adamw_decays_matrices_only_and_follows_the_schedule() -> None:
    from models import GPT, GPTConfig
    from trainer.lit_gpt import OptimConfig, adamw_with_schedule, lr_factor

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, d_model=32, n_head=4,
                          attention={"name": "kv_shift"}))
    optim = OptimConfig()
    opt, sched = adamw_with_schedule(model.parameters(), optim, total_steps=50)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == optim.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    shift = model.blocks[0].attn
    assert any(p is shift.alpha1 for p in plain["params"]) and any(p is shift.beta2 for p in plain["params"])
    for step in range(3):
        assert opt.param_groups[0]["lr"] == pytest.approx(optim.lr * lr_factor(step, optim.warmup_steps, 50,
                                                                                 optim.min_lr_ratio))
        opt.step()
        sched.step()


def test_adamw_is_fused_on_cpu_and_steps_as_the_foreach_reference() -> None:
    """The fused kernel (used wherever torch has one, CPU included) takes the same steps as torch's foreach AdamW."""
    from models import GPT, GPTConfig
    from trainer.lit_gpt import OptimConfig, adamw_with_schedule

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, d_model=32, n_head=4))
    reference = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, d_model=32, n_head=4))
    reference.load_state_dict(model.state_dict())
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optim = OptimConfig(warmup_steps=0)
    opt, _ = adamw_with_schedule(model.parameters(), optim, total_steps=50)
    assert all(group["fused"] for group in opt.param_groups)
    ref = torch.optim.AdamW([{"params": [p for p in reference.parameters() if p.dim() >= 2],
                              "weight_decay": optim.weight_decay},
                             {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=opt.param_groups[0]["lr"], betas=(optim.beta1, optim.beta2), eps=optim.eps,
                            foreach=True)  # the schedule's first-step rate (it is not stepped here)
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m(idx, idx)[1].backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
        assert (p - start[name]).abs().max() > 1e-3, name  # three full-rate steps moved every parameter


def test_train_runs_a_composed_config_in_process(tmp_path: Path, corpus_cache: Path) -> None:
    """`train(cfg, hydra_cfg)` without the command line, as lightning-hydra-template's tests call theirs:
    compose, set the Hydra config @hydra.main would set, train; a bad value is a RunRefusedError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from tests.conftest import CONF
    from trainer.train import RunRefusedError, train

    run_dir = tmp_path / "run"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["trainer=debug", "logger=csv", "spectral=off", f"paths.run_dir={run_dir}",
                                          f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    best = train(task, cfg.hydra)
    assert best is not None and 0 < best < 8
    assert (run_dir / "DONE").read_text().startswith("finished at step 6")
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 6
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer.max_steps == 6
    assert train(task, cfg.hydra) == best  # DONE: nothing to do, the same objective

    with open_dict(task):
        task.trainer.max_steps = 0
        task.paths.run_dir = str(tmp_path / "refused")
    with pytest.raises(RunRefusedError, match=r"trainer\.max_steps=0"):
        train(task, cfg.hydra)
    assert not (tmp_path / "refused").exists()  # refused before any work
