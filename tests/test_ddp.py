"""Scale-out: DDP on 2 CPU processes (gloo) under Hydra, and the FSDP code path of the spectral callback.

Lightning's DDP launcher re-executes the Hydra app for rank 1 with `hydra.run.dir` set to rank 0's
directory: both ranks must work in one run directory, and only rank 0 writes the spectra, DONE
and the W&B run. FSDP needs GPUs (Lightning refuses it on CPU): its config is composed and its
strategy built here, and the callback's gather is checked with FSDP's own entry point recorded.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from analysis import SpectralAnalyzer
from callbacks import spectral as spectral_module
from callbacks.spectral import SpectralHealthCallback
from models import GPT, GPTConfig
from tests.conftest import CONF, ROOT, wandb_files
from trainer.sweep import is_global_zero, model_from_checkpoint
from trainer.wandb_records import run_id

DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.val_check_interval=4",
       "trainer.log_every_n_steps=1", "data.batch_size=8", "data.block_size=64", "data.val_batches=1",
       "module.sample_tokens=0", "spectral.every_n_steps=2", "spectral.mc_draws=200")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_ddp_on_two_cpu_processes_logs_the_spectra_of_the_trained_weights(tmp_path: Path,
                                                                         corpus_cache: Path) -> None:
    proc = run(*DDP, f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in out and "Starting with 2 processes" in out
    (run_dir,) = [p.parent for p in tmp_path.glob("default/*/.hydra")]
    # rank 1 ran in rank 0's directory (Lightning's Hydra re-launch) and resumed nothing
    rank1_log = (run_dir / "train_ddp_process_1.log").read_text()
    assert f"run directory: {run_dir} (resume from scratch)" in rank1_log
    # only rank 0 wrote: one W&B session whose id is the stored one, DONE, one file per check
    (wandb_file,) = wandb_files(run_dir)
    assert run_id(wandb_file) == (run_dir / "wandb_run_id").read_text().strip()
    assert (run_dir / "DONE").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    spectra = sorted((run_dir / "spectra").glob("step*.npz"))
    assert [int(np.load(f)["step"]) for f in spectra] == [0, 2, 4]

    # the check at step 4 saw the weights the run ended with: recompute it in this single process
    logged = np.load(spectra[-1])
    model = model_from_checkpoint(last)
    analyzer = SpectralAnalyzer(null="product", fa_level=0.01, mc_draws=200, cache_dir=str(corpus_cache / "nulls"))
    report = analyzer.analyze(model.qk_factors())
    here = report.heads["content"]
    assert logged["content/eigs"].shape == tuple(here.eigs.shape) == (4, 4, 32)
    np.testing.assert_allclose(logged["content/eigs"], here.eigs.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logged["content/lambda_max"], here.lambda_max.numpy(), rtol=1e-4)
    np.testing.assert_allclose(logged["content/threshold"], here.threshold.numpy(), rtol=1e-4)
    np.testing.assert_array_equal(logged["content/num_spikes"], here.num_spikes.numpy())


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True),
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # rank 0 once Lightning's launcher started the others
    ({"LOCAL_RANK": "1"}, False),  # a rank Lightning started
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # first process of a second node
    ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
    ({"SLURM_PROCID": "2"}, False),  # a SLURM (submitit) task
])
def test_only_global_rank_zero_keeps_books(env: dict[str, str], zero: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_global_zero() is zero


def tiny_model() -> GPT:
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, d_model=32, n_head=2))


def callback(run_dir: Path, cache: Path, **kwargs: object) -> SpectralHealthCallback:
    """A callback that checks every step, with the probe batch on_train_start would have taken."""
    cb = SpectralHealthCallback(every_n_steps=1, null_model="mp", mc_draws=10, run_dir=str(run_dir),
                                cache_dir=str(cache), **kwargs)
    cb.probe = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    return cb


def stub_trainer(rank_zero: bool, strategy: object = None) -> SimpleNamespace:
    strategy = strategy or SimpleNamespace(broadcast=lambda obj, src=0: obj)
    return SimpleNamespace(global_step=0, is_global_zero=rank_zero, strategy=strategy, loggers=[],
                           should_stop=False)


def test_only_rank_zero_computes_and_writes_spectra(tmp_path: Path) -> None:
    planted = {"spikes": {"level": "WARN", "k": 1, "K": 1}}  # any finding alerts at once
    for rank_zero, run_dir in ((False, tmp_path / "rank1"), (True, tmp_path / "rank0")):
        cb = callback(run_dir, tmp_path / "nulls", rules=planted)
        probe = tiny_model() if rank_zero else SimpleNamespace(qk_factors=pytest.fail)  # rank 1 never reads it
        cb._check(stub_trainer(rank_zero), probe, spectral=True)
        assert (run_dir / "spectra" / "step0000000.npz").exists() is rank_zero
    assert not (tmp_path / "rank1").exists()  # nothing at all: no spectra/, no alerts.jsonl


def test_fsdp_config_composes_and_builds_a_sharding_strategy(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from models.gpt import Block

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["trainer=fsdp", f"paths.run_dir={tmp_path}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 2
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}


def test_under_fsdp_every_rank_gathers_and_rank_zero_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    calls, inside = [], []

    @contextlib.contextmanager
    def summon(module: object, **kwargs: object):
        calls.append((module, kwargs))
        inside.append(True)
        yield
        inside.pop()

    monkeypatch.setattr(FullyShardedDataParallel, "summon_full_params", staticmethod(summon))
    strategy = FSDPStrategy()
    wrapped = torch.nn.Linear(2, 2)
    strategy.model = wrapped  # stands for the FSDP-wrapped LightningModule
    strategy.broadcast = lambda obj, src=0: obj
    probe = tiny_model()
    factors, read_inside = probe.qk_factors, []
    probe.qk_factors = lambda: read_inside.append(bool(inside)) or factors()
    for rank_zero in (True, False):
        cb = callback(tmp_path, tmp_path / "nulls")
        cb._check(stub_trainer(rank_zero, strategy), probe, spectral=True)
    assert [(m, k) for m, k in calls] == [(wrapped, {"writeback": False, "rank0_only": True})] * 2
    assert read_inside == [True]  # rank 0 read the probe inside the gather; rank 1 only took part
    assert spectral_module.full_parameters(stub_trainer(True)).__class__ is contextlib.nullcontext


@pytest.mark.slow
def test_ddp_jobs_of_a_multirun_each_get_their_own_ranks_and_directory(tmp_path: Path, corpus_cache: Path) -> None:
    """Lightning re-executes sys.argv for rank 1: in a multirun the sweep callback swaps in the job's
    own command line, and after the job leaves the process group for the next job to build its own."""
    args = [a for a in DDP if not a.startswith(("trainer.max_steps", "trainer.val_check"))]
    proc = run("+sweep=attention_variants", "attention=mha,gqa", *args, "trainer.max_steps=2",
               "trainer.val_check_interval=2", f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "attention_variants").glob("*/.hydra"))
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "DONE").exists()
        assert f"run directory: {job} (resume from scratch)" in (job / "train_ddp_process_1.log").read_text()
        (wandb_file,) = wandb_files(job)
        assert run_id(wandb_file) == (job / "wandb_run_id").read_text().strip()
    assert len({(job / "wandb_run_id").read_text() for job in jobs}) == 2
