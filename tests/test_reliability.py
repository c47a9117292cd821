"""Reliability: a crash, a damaged checkpoint, a failing dependency or a diverging loss loses nothing.

Runs go through the real entry point (`trainer.train`, real Lightning Trainer, real files, real
offline W&B where W&B is the point) in child processes (tests/reliability_hooks.py: `run_forked`);
faults are real: SIGKILL, truncated and bit-flipped files, a full or read-only tmpfs mounted over
the W&B directory, wandb.init raising, LAPACK errors, an overflowing forward pass.

Default selection: one random kill point of a 16-step run, a damaged last.ckpt, the checkpoint
file format, W&B and spectral faults, divergence. `pytest -m slow tests/test_reliability.py`:
many kill points with W&B records compared, and kills of a fresh `python -m trainer.train` process.
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import ROOT, compose_train, train_cmd, wandb_files
from tests.reliability_hooks import WHERE, run_forked
from tests.reliability_runs import (
    MAX_STEPS,
    TINY,
    alert_records,
    assert_same_run,
    csv_state,
    max_state_difference,
    mount_tmpfs,
    run_dir_of,
    train_forked,
    wandb_state,
)
from trainer.checkpoint_io import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    previous_path,
    verify_checkpoint,
)
from trainer.run_dir import NoUsableCheckpointError, RunDirectory
from trainer.wandb_records import alerts, run_id


def random_kill_point(rng: random.Random, where: str | None = None) -> str:
    """A step and a point in it: after the update (1..16), between backward and update (0..15), or while a
    checkpoint is being serialised (4, 8, 12, 16: the steps that save one)."""
    where = where or rng.choice(WHERE)
    if where == "in_save":
        return f"{rng.choice(range(4, MAX_STEPS + 1, 4))}:{where}"
    return f"{rng.randrange(0, MAX_STEPS) + (where == 'batch_end')}:{where}"


def test_crash_at_a_random_step_resumes_to_the_same_run(reference: Path, corpus_cache: Path,
                                                         tmp_path: Path) -> None:
    """SIGKILL at a random step and point (after a step, mid-step, mid-checkpoint-save), then the same command."""
    kill = random_kill_point(random.Random())
    print("kill point:", kill)
    crashed = train_forked(tmp_path, corpus_cache, "logger=csv", kill=kill)
    assert crashed.returncode == -signal.SIGKILL, (kill, crashed.output[-3000:])
    run = run_dir_of(tmp_path)
    assert not (run / "DONE").exists()

    resumed = train_forked(tmp_path, corpus_cache, "logger=csv")
    assert resumed.returncode == 0, (kill, resumed.output[-3000:])
    if (run / "checkpoints" / "last.ckpt").exists():
        assert "resume from" in resumed.output
    assert_same_run(reference, run)
    assert not list((run / "checkpoints").glob(".*.tmp"))  # a save cut short left nothing behind


def test_damaged_last_checkpoint_is_reported_and_the_previous_one_used(reference: Path, corpus_cache: Path,
                                                                       tmp_path: Path) -> None:
    crashed = train_forked(tmp_path, corpus_cache, "logger=csv", kill="14")  # last.ckpt at 12, best.ckpt at 8
    assert crashed.returncode == -signal.SIGKILL
    run = run_dir_of(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert verify_checkpoint(last)["global_step"] == 12 and verify_checkpoint(previous_path(last))["global_step"] == 8
    with open(last, "r+b") as f:  # a copy cut short, as by a full disk or an interrupted rsync
        f.truncate(last.stat().st_size // 2)

    resumed = train_forked(tmp_path, corpus_cache, "logger=csv")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "last.ckpt is truncated or not a checkpoint" in resumed.output
    assert "resuming from" in resumed.output and "last.prev.ckpt (step 8)" in resumed.output
    assert (run / "checkpoints" / "last.ckpt.corrupt").exists()
    assert_same_run(reference, run)  # four more steps repeated, nothing lost


# --------------------------------------------------------------------------- checkpoint files


def small_checkpoint(step: int = 3) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.randn(64, 64, generator=g)}}


class _Boom:
    def __reduce__(self) -> tuple:
        raise RuntimeError("serialisation failed half way")


class _Payload:
    """An object whose unpickling would run code (creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_atomic_save_keeps_the_previous_checkpoint_and_never_a_partial_one(tmp_path: Path) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(small_checkpoint(1), path)
    io.save_checkpoint(small_checkpoint(2), path)
    assert verify_checkpoint(path)["global_step"] == 2 and verify_checkpoint(previous_path(path))["global_step"] == 1
    with pytest.raises(RuntimeError, match="half way"):
        io.save_checkpoint({**small_checkpoint(3), "x": _Boom()}, path)
    assert verify_checkpoint(path)["global_step"] == 2  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no temp file
    io.save_checkpoint(small_checkpoint(4), tmp_path / "checkpoints" / "best.ckpt")
    assert verify_checkpoint(tmp_path / "checkpoints" / "best.ckpt")["global_step"] == 4


def test_damage_is_detected_and_named(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint(small_checkpoint(), good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"truncated\.ckpt is truncated or not a checkpoint"):
        verify_checkpoint(truncated)

    flipped = tmp_path / "flipped.ckpt"  # one bit in the tensor data: torch.load alone does not notice
    offset = data.index(torch.load(good, weights_only=True)["state_dict"]["w"].numpy().tobytes()[:64]) + 100
    flipped.write_bytes(data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1:])
    torch.load(flipped, weights_only=True)
    with pytest.raises(CorruptCheckpointError, match=r"flipped\.ckpt is corrupted: member .* fails its CRC-32"):
        verify_checkpoint(flipped)

    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        verify_checkpoint(empty)


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    """A checkpoint that would run code when unpickled is refused, by the verifier and by the loader
    Lightning resumes through; the code does not run."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({**small_checkpoint(), "payload": _Payload(marker)}, path)
    with pytest.raises(CorruptCheckpointError, match="weights_only=True"):
        verify_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()
    cfg = compose_train(["trainer=debug", "logger=csv"], tmp_path / "run")  # the shipped trainer uses the plugin
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_resume_picks_the_newest_checkpoint_that_verifies(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    io = AtomicCheckpointIO()
    io.save_checkpoint(small_checkpoint(2), run.checkpoint_dir / "best.ckpt")
    io.save_checkpoint(small_checkpoint(4), run.last_checkpoint)
    io.save_checkpoint(small_checkpoint(6), run.last_checkpoint)  # last.prev.ckpt is step 4
    (run.checkpoint_dir / ".last.ckpt.123.tmp").write_bytes(b"half")  # a save cut short
    run.alerts_file.write_text("".join(json.dumps({"step": s, "rule": "spikes"}) + "\n" for s in (0, 4, 6)))
    run.spectra_dir.mkdir()
    for s in (0, 4, 6):
        np.savez(run.spectra_dir / f"step{s:07d}.npz", step=np.array(s))

    assert run.resume_checkpoint("auto") == str(run.last_checkpoint)
    assert not list(run.checkpoint_dir.glob(".*.tmp"))

    run.last_checkpoint.write_bytes(run.last_checkpoint.read_bytes()[:100])
    assert run.resume_checkpoint("must") == str(previous_path(run.last_checkpoint))
    assert [json.loads(line)["step"] for line in run.alerts_file.read_text().splitlines()] == [0, 4]
    assert sorted(p.name for p in run.spectra_dir.iterdir()) == ["step0000000.npz", "step0000004.npz"]
    assert (run.checkpoint_dir / "last.ckpt.corrupt").exists()

    previous_path(run.last_checkpoint).write_bytes(b"garbage")
    assert run.resume_checkpoint("auto") == str(run.checkpoint_dir / "best.ckpt")  # step 2, the only good one
    (run.checkpoint_dir / "best.ckpt").unlink()
    with pytest.raises(NoUsableCheckpointError, match="resume=never"):
        run.resume_checkpoint("auto")
    assert run.resume_checkpoint("never") is None
    assert RunDirectory(tmp_path / "fresh").resume_checkpoint("auto") is None


# --------------------------------------------------------------------------- faults in dependencies


def _break_wandb_init() -> None:
    import wandb

    def init(*args: object, **kwargs: object) -> None:
        raise wandb.errors.CommError("wandb.init failed (injected fault)")

    wandb.init = init


@pytest.mark.parametrize("fault", ["init_raises", "disk_full"])
def test_wandb_failure_falls_back_to_csv_and_training_continues(fault: str, corpus_cache: Path,
                                                                tmp_path: Path) -> None:
    args = (*TINY, "trainer.max_steps=6", "spectral.every_n_steps=2", f"paths.root={tmp_path}",
            f"paths.cache_dir={corpus_cache}")
    if fault == "init_raises":
        proc = run_forked(args, prepare=_break_wandb_init)
        expected = "CommError: wandb.init failed (injected fault)"
    else:  # a 256 KiB tmpfs over <run_dir>/wandb, filled up before the run starts
        target = tmp_path / "default" / _override_dirname(args) / "wandb"
        proc = run_forked(args, prepare=lambda: mount_tmpfs(target, "rw", fill=True))
        if proc.returncode == 77:
            pytest.skip(proc.output.strip())
        expected = "No space left on device"
        assert run_dir_of(tmp_path) == target.parent
    assert proc.returncode == 0, proc.output[-3000:]
    assert "W&B could not start" in proc.output and expected in proc.output
    run = RunDirectory(run_dir_of(tmp_path))
    assert run.is_done() and not wandb_files(run.path)
    steps = {k[0] for k in csv_state(run.path) if k[1] == "train/loss"}
    assert steps == set(range(6))  # every step logged, to CSV
    assert (run.path / "spectra" / "step0000006.npz").exists()


def _override_dirname(args: tuple[str, ...]) -> str:
    """The run directory name Hydra derives from the overrides (trainer/run_dir.py), for mounting over it."""
    from trainer.run_dir import run_id_from_overrides

    excluded = ("paths.root", "paths.cache_dir")
    kept = sorted(a for a in args if a.split("=", 1)[0].lstrip("+") not in excluded)
    return run_id_from_overrides(",".join(kept))


def test_spectral_analysis_failure_is_an_error_alert_not_a_crash(corpus_cache: Path, tmp_path: Path) -> None:
    """Every SVD/eigendecomposition fails from train start: the check at step 2 raises an ERROR alert and
    takes the configured actions (log, checkpoint, stop); no exception leaves the callback."""
    proc = train_forked(tmp_path, corpus_cache, "logger=csv", "spectral.every_n_steps=2",
                        "+callbacks.svd._target_=tests.reliability_hooks.SVDFails")
    assert proc.returncode == 3, proc.output[-3000:]  # stopped early: not success
    run = run_dir_of(tmp_path)
    errors = [a for a in alert_records(run) if a["level"] == "ERROR"]
    assert errors and errors[0]["rule"] == "analysis_error" and errors[0]["step"] == 2
    assert "LinAlgError" in errors[0]["text"] and "failed to converge" in errors[0]["text"]
    assert verify_checkpoint(run / "checkpoints" / "alert-step0000002.ckpt")["global_step"] == 2
    assert "stopping training at step 2" in proc.output and not (run / "DONE").exists()
    assert ("error: stopped at step 2 of 16: the spectral callback's 'stop' action at step 2 (analysis_error). "
            "The run is not DONE") in proc.output


# --------------------------------------------------------------------------- divergence


def test_nan_loss_stops_with_a_message_and_the_last_finite_state(corpus_cache: Path, tmp_path: Path) -> None:
    proc = train_forked(tmp_path, corpus_cache, "logger=csv",
                        "+callbacks.nan._target_=tests.reliability_hooks.LossToNaN", "+callbacks.nan.step=5")
    assert proc.returncode == 3, proc.output[-3000:]  # stopped early: not success
    assert "error: stopped at step 6 of 16: training diverged at step 5 (NaN/inf loss or gradient)" in proc.output
    assert "training diverged at step 5: the loss or a gradient is NaN/inf" in proc.output
    run = run_dir_of(tmp_path)
    saved = run / "checkpoints" / "diverged-step0000005.ckpt"
    assert f"the last finite state (step 5, before this update) is saved in {saved}" in proc.output
    assert verify_checkpoint(saved)["global_step"] == 5
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())
    losses = {k[0]: float(v) for k, v in csv_state(run).items() if k[1] == "train/loss"}
    assert all(np.isfinite(losses[s]) for s in range(5)) and not np.isfinite(losses[5])
    assert max(losses) == 5 and not (run / "DONE").exists()  # stopped: no step after the divergence
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in last.values())  # the skipped update left the weights finite


# --------------------------------------------------------------------------- slow: many kill points, W&B


def _kill_points(n: int, seed: int) -> list[str]:
    """`n` random kill points cycling through the points in a step; every third kills W&B's service too."""
    rng = random.Random(seed)
    return [random_kill_point(rng, WHERE[i % len(WHERE)]) + (":group" if i % 3 == 2 else "") for i in range(n)]


@pytest.mark.slow
def test_many_kill_points_resume_to_the_same_wandb_run(tmp_path_factory: pytest.TempPathFactory,
                                                        corpus_cache: Path) -> None:
    """Real offline W&B: after each kill and resume, the W&B run id is kept; every W&B record of the steps the
    resumed session ran equals the uninterrupted run's; records of earlier steps are those the killed session's
    W&B service had written (it flushes every 0.1 s: a loss of at most the last 0.1 s before the kill, and only
    of steps before the resume checkpoint); no alert is sent again unless its check was repeated; CSV-free
    records (alerts.jsonl, spectra/, checkpoints) equal the uninterrupted run's."""
    ref_root = tmp_path_factory.mktemp("wandb-reference")
    assert train_forked(ref_root, corpus_cache).returncode == 0
    ref = run_dir_of(ref_root)
    ref_history = wandb_state(ref)
    ref_alerts = sorted(a["text"] for f in wandb_files(ref) for a in alerts(f))
    report = []
    for kill in _kill_points(9, seed=int(os.environ.get("QKSCOPE_KILL_SEED", "8"))):
        root = tmp_path_factory.mktemp("wandb-crash")
        crashed = train_forked(root, corpus_cache, kill=kill)
        assert crashed.returncode == -signal.SIGKILL, kill
        run = run_dir_of(root)
        last = run / "checkpoints" / "last.ckpt"
        resumed_from = verify_checkpoint(last)["global_step"] if last.exists() else 0
        assert train_forked(root, corpus_cache).returncode == 0, kill
        files = wandb_files(run)
        assert len(files) == 2 and {run_id(f) for f in files} == {(run / "wandb_run_id").read_text().strip()}, kill
        got = wandb_state(run)
        lost = ref_history.keys() - got.keys()
        assert not got.keys() - ref_history.keys(), kill
        assert all(step <= resumed_from for step, _ in lost), (kill, resumed_from, sorted(lost)[:5])
        diff = max(abs(float(v) - float(got[k])) for k, v in ref_history.items()
                   if k in got and isinstance(v, (int, float)))
        assert diff <= 1e-6, kill
        media = [k for k, v in ref_history.items() if k in got and not isinstance(v, (int, float))]
        assert all(got[k] == ref_history[k] for k in media if "artifact_path" not in k[1]), kill  # ids are random
        second = [int(a["text"].split(":")[0].removeprefix("step ")) for a in alerts(files[1])]
        assert all(step > resumed_from for step in second), (kill, resumed_from, second)  # nothing re-fired
        sent = {a["text"] for f in files for a in alerts(f)}
        assert sent <= set(ref_alerts) and alert_records(ref) == alert_records(run), kill
        diff = max(diff, assert_same_run_state(ref, run))
        report.append(f"{kill}: resumed from {resumed_from}, W&B records lost {len(lost)}, alerts "
                      f"{len(sent)}/{len(ref_alerts)}, max difference {diff:g}")
    print("\n".join(["", f"{len(ref_history)} W&B (step, key) records compared per run", *report]))


def assert_same_run_state(reference: Path, run: Path) -> float:
    return max(max_state_difference(reference / "checkpoints" / n, run / "checkpoints" / n)
               for n in ("last.ckpt", "best.ckpt"))


@pytest.mark.slow
def test_fresh_process_killed_at_random_times_resumes_to_the_same_run(reference: Path, corpus_cache: Path,
                                                                     tmp_path: Path) -> None:
    """`python -m trainer.train` as a user runs it, SIGKILLed from outside at random wall-clock times (any
    point, a checkpoint write included: last.ckpt is written every step here) until it finishes."""
    rng = random.Random(int(os.environ.get("QKSCOPE_KILL_SEED", "8")))
    args = [*TINY, "logger=csv", "callbacks.last_checkpoint.every_n_train_steps=1",
            f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    kills = []
    for _ in range(12):
        started = time.time()
        proc = subprocess.Popen(train_cmd(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, text=True)
        while proc.poll() is None and _last_checkpoint_mtime(tmp_path) < started:  # wait until it trains
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(verify_checkpoint(run_dir_of(tmp_path) / "checkpoints" / "last.ckpt")["global_step"])
    run = run_dir_of(tmp_path)
    assert (run / "DONE").exists() and len(kills) >= 2, kills
    # every_n_train_steps=1 renames the run directory but does not change the training
    diff = assert_same_run_state(reference, run)
    assert diff <= 1e-6
    ref_csv, got_csv = csv_state(reference), csv_state(run)
    assert {k: v for k, v in ref_csv.items() if "loss" in k[1]} == {k: v for k, v in got_csv.items() if "loss" in k[1]}
    assert alert_records(reference) == alert_records(run)
    print(f"killed with last.ckpt at steps {kills}; max difference {diff}")


def _last_checkpoint_mtime(root: Path) -> float:
    found = list(root.glob("default/*/checkpoints/last.ckpt"))
    return found[0].stat().st_mtime if found else 0.0


@pytest.mark.slow
def test_read_only_wandb_directory_falls_back_to_csv(corpus_cache: Path, tmp_path: Path) -> None:
    args = (*TINY, "trainer.max_steps=4", f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    target = tmp_path / "default" / _override_dirname(args) / "wandb"
    proc = run_forked(args, prepare=lambda: mount_tmpfs(target, "ro", fill=False))
    if proc.returncode == 77:
        pytest.skip(proc.output.strip())
    assert proc.returncode == 0, proc.output[-3000:]
    assert "W&B could not start" in proc.output and "Read-only file system" in proc.output
    assert (run_dir_of(tmp_path) / "DONE").exists()

