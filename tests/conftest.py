"""Shared helpers: compose the real config, run the real entry point, find W&B files."""

import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

import trainer.config  # noqa: E402,F401  (registers the schema and resolvers)


def compose_train(overrides: list[str], run_dir: Path) -> DictConfig:
    """The training config as `python -m trainer.train` would compose it, with a fixed run dir."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(
            "train",
            overrides=[f"paths.run_dir={run_dir}", f"paths.root={run_dir.parent}",
                       "logger.wandb.name=test", *overrides]
            if not any(o.startswith("logger=") for o in overrides)
            else [f"paths.run_dir={run_dir}", f"paths.root={run_dir.parent}", *overrides],
        )


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", *overrides]


@dataclass
class Finished:
    """What a finished run printed and its exit status, as subprocess.CompletedProcess has them."""

    returncode: int
    stdout: str
    stderr: str


def run_train(*overrides: str) -> Finished:
    """`python -m trainer.train *overrides`, run in the test process (`run_module`)."""
    return run_module("trainer.train", *overrides)


def run_module(module: str, *args: str) -> Finished:
    """Run an entry point (`python -m <module> *args`: Hydra, its callbacks, the task) inside the test
    process; what it prints and its exit status come back as a subprocess would give them. W&B
    offline, one torch thread, the W&B run finished and its service stopped, argv, environment and
    logging restored. Tests that need a process of their own (SIGKILL, DDP, the README) use
    `run_train_process`."""
    env = {"WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_argv, threads = sys.argv, torch.get_num_threads()
    root, saved_handlers, saved_level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    out, err = io.StringIO(), io.StringIO()
    code = 1
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run_as_main(module, args)
            finally:  # finish the run and stop this process's W&B service: a later subprocess or fork of the
                with contextlib.suppress(SystemExit):  # test process would otherwise connect to it (WANDB_SERVICE)
                    wandb.teardown(exit_code=code)
                os.environ.pop("WANDB_SERVICE", None)
    finally:
        for handler in root.handlers:  # Hydra's job logging (console, <job>.log): closed, pytest's put back
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:], root.level = saved_handlers, saved_level
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Finished(code, out.getvalue(), err.getvalue())


def run_as_main(module: str, args: Sequence[str]) -> int:
    """`python -m <module> *args` in this process, as `python -m` runs it (sys.argv set, the module run as
    __main__); -> its exit status, 1 with the traceback printed if it raised."""
    sys.argv = [module.replace(".", "/") + ".py", *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def run_train_process(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real entry point in a subprocess from the repository root."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(train_cmd(*overrides), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def wandb_files(run_dir: Path) -> list[Path]:
    """The `.wandb` transaction logs of every W&B session of a run directory, oldest first."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenized KJV cache shared by every test of the session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def surgery_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus_cache: Path) -> Path:
    """`checkpoints/last.ckpt` of one real debug training run, shared by the surgery tests."""
    root = tmp_path_factory.mktemp("surgery_runs")
    proc = run_train("trainer=debug", "logger=csv", "spectral=off", f"paths.root={root}",
                     f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (done,) = root.glob("default/*/DONE")
    return done.parent / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_cache: Path) -> Path:
    """The uninterrupted tiny run (tests/reliability_runs.py: TINY) every crashed run is compared with."""
    from tests.reliability_runs import alert_records, run_dir_of, train_forked

    root = tmp_path_factory.mktemp("reference")
    proc = train_forked(root, corpus_cache, "logger=csv")
    assert proc.returncode == 0, proc.output[-3000:]
    run = run_dir_of(root)
    assert len(alert_records(run)) >= 2  # the spike planted at step 0 and the one planted at step 6
    return run
