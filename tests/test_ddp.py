"""Scale-out: DDP on 2 CPU processes (gloo) under Hydra, and the FSDP code path of the spectral callback.

Lightning's DDP launcher re-executes the Hydra app for rank 1 with `hydra.run.dir` set to rank 0's
directory: both ranks must work in one run directory, and only rank 0 writes the spectra, DONE
and the W&B run. Lightning's Trainer refuses FSDP on CPU, but FSDP itself runs there (gloo, the CPU
device named): the config's strategy wraps the real LightningModule in 2 forked processes, and the
callback's gather is checked against the unsharded model.
"""

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from analysis.spectral import SpectralAnalyzer
from callbacks import spectral as spectral_module
from callbacks.spectral import SpectralHealthCallback
from models import GPT, GPTConfig, QKFactors
from tests.conftest import CONF, ROOT, wandb_files
from trainer.distributed import is_global_zero
from trainer.run_results import model_from_checkpoint
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
    return SimpleNamespace(global_step=0, max_steps=10, is_global_zero=rank_zero, strategy=strategy, loggers=[],
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_batch(rank: int, vocab: int) -> torch.Tensor:
    """Rank `rank`'s training batch (2 x 17 tokens: inputs and targets shifted by one)."""
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(100 + rank))


def sgd_step(module: torch.nn.Module, params: list[torch.nn.Parameter], batches: list[torch.Tensor]) -> None:
    """One SGD step on the mean next-token loss of `batches` (the mean over ranks FSDP's gradient reduction takes)."""
    opt = torch.optim.SGD(params, lr=5.0)
    losses = [torch.nn.functional.cross_entropy(module(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()) for b in batches]
    (sum(losses) / len(losses)).backward()
    opt.step()


def detached(factors: list[list[QKFactors]]) -> list[list[QKFactors]]:
    """A copy of a QK probe that holds no parameter (nor its autograd history)."""
    return [[dataclasses.replace(f, left=f.left.detach().clone(), right=f.right.detach().clone()) for f in layer]
            for layer in factors]


def fsdp_worker(rank: int, port: int, out: Path) -> None:
    """One of 2 gloo ranks: the LitGPT of the real trainer=fsdp config, wrapped by real FSDP as Lightning's
    FSDPStrategy._setup_model wraps it (its kwargs, sharding and offload), trained one step, then one
    spectral check of the callback. Rank r writes what it saw to out/rank{r}.pt."""
    import copy

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose("train", overrides=["trainer=fsdp", f"paths.run_dir={out}"])
        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, FSDPStrategy)
        torch.manual_seed(0)  # the same initial weights on both ranks, as Lightning seeds them
        module = instantiate(cfg.module)
        vocab = module.model_config.vocab_size
        initial = detached(module.qk_factors())
        reference = copy.deepcopy(module)  # unsharded, trained on both ranks' batches in this one process
        sgd_step(reference, list(reference.parameters()), [fsdp_batch(r, vocab) for r in range(2)])

        # Lightning's _setup_model passes device_id=root_device.index, None on CPU, which FSDP refuses
        # ("FSDP needs a non-CPU accelerator device"): the CPU device is named here, all else is the strategy's.
        strategy.model = FullyShardedDataParallel(
            module, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
            sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"), **strategy.kwargs)
        sgd_step(strategy.model, list(strategy.model.parameters()), [fsdp_batch(rank, vocab)])
        full_numel = sum(p.numel() for p in reference.parameters())
        local_numel = sum(p.numel() for p in module.parameters())

        real_summon = FullyShardedDataParallel.summon_full_params
        calls, inside, reads = [], [], []

        @contextlib.contextmanager
        def spy(target: torch.nn.Module, **kwargs: object):  # records the call, gathers for real
            calls.append({"is_strategy_model": target is strategy.model, **kwargs})
            with real_summon(target, **kwargs):
                inside.append(sum(p.numel() for p in module.parameters()))
                yield
                inside.pop()

        FullyShardedDataParallel.summon_full_params = staticmethod(spy)
        probe = module.qk_factors

        def read() -> list:
            factors = probe()
            reads.append({"inside": list(inside), "factors": detached(factors)})
            return factors

        module.qk_factors = read
        cb = callback(out / f"rank{rank}", out / "nulls", actions={"ERROR": ["log"]})
        cb._check(stub_trainer(rank == 0, strategy), module, spectral=True)
        torch.save({"calls": calls, "reads": reads, "full_numel": full_numel, "local_numel": local_numel,
                    "numel_after": sum(p.numel() for p in module.parameters()),
                    "reference": detached(reference.qk_factors()), "initial": initial}, out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One spectral check of the callback under real FSDP (FULL_SHARD) on 2 CPU processes (gloo)."""
    out = tmp_path_factory.mktemp("fsdp")
    # forked, the ranks start with this process's imports (spawned, each re-imports Lightning: ~10 s on 2 cores)
    torch.multiprocessing.start_processes(fsdp_worker, args=(free_port(), out), nprocs=2, start_method="fork")
    return out


def test_under_fsdp_every_rank_gathers_and_rank_zero_reads(fsdp_check: Path, tmp_path: Path) -> None:
    with torch.serialization.safe_globals([QKFactors]):  # the ranks saved their probes as QKFactors
        seen = [torch.load(fsdp_check / f"rank{r}.pt", weights_only=True) for r in range(2)]
    full = seen[0]["full_numel"]
    # the weights really are sharded: each rank holds part, together all of them, and again after the gather
    assert [s["local_numel"] for s in seen] == [s["numel_after"] for s in seen]
    assert all(0 < s["local_numel"] < full for s in seen) and sum(s["local_numel"] for s in seen) == full
    # every rank entered FSDP's gather once, on the wrapped LightningModule, read-only, full weights on rank 0 only
    expected = {"is_strategy_model": True, "writeback": False, "rank0_only": True}
    assert [s["calls"] for s in seen] == [[expected]] * 2
    # rank 0 read the probe inside the gather, holding every weight; rank 1 only took part
    (read,) = seen[0]["reads"]
    assert read["inside"] == [full]
    assert seen[1]["reads"] == []
    # what rank 0 read is the unsharded model's probe after the same training step (not the initial weights)
    got, want, initial = read["factors"], seen[0]["reference"], seen[0]["initial"]
    assert [[f.kind for f in layer] for layer in got] == [[f.kind for f in layer] for layer in want]
    moved = 0.0
    for layer_got, layer_want, layer_init in zip(got, want, initial, strict=True):
        for g, w, i in zip(layer_got, layer_want, layer_init, strict=True):
            assert g.left.shape == w.left.shape == (4, 128, 32)
            torch.testing.assert_close(g.left, w.left, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g.right, w.right, rtol=1e-4, atol=1e-6)
            moved = max(moved, float((w.left - i.left).abs().max()), float((w.right - i.right).abs().max()))
    assert moved > 1e-3  # the training step changed the weights the gather must return
    torch.testing.assert_close(seen[1]["reference"][0][0].left, want[0][0].left)  # both ranks' reference agree

    # rank 0 wrote the check's spectra, those of the unsharded trained model; rank 1 wrote nothing
    assert not (fsdp_check / "rank1").exists()
    logged = np.load(fsdp_check / "rank0" / "spectra" / "step0000000.npz")
    analyzer = SpectralAnalyzer(null="mp", fa_level=0.01, mc_draws=10, cache_dir=str(tmp_path / "nulls"))
    here = analyzer.analyze(want).heads["content"]
    assert logged["content/eigs"].shape == tuple(here.eigs.shape) == (4, 4, 32)
    np.testing.assert_allclose(logged["content/eigs"], here.eigs.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(logged["content/lambda_max"], here.lambda_max.numpy(), rtol=1e-4)
    assert spectral_module.full_parameters(stub_trainer(True)).__class__ is contextlib.nullcontext


def test_under_fsdp_the_logit_check_reads_whole_weights(fsdp_check: Path) -> None:
    alerts = (fsdp_check / "rank0" / "alerts.jsonl")
    records = [json.loads(line) for line in alerts.read_text().splitlines()] if alerts.exists() else []
    assert [r["text"] for r in records if r["rule"] == "analysis_error"] == []
    assert (fsdp_check / "rank0" / "logits.jsonl").exists()


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
