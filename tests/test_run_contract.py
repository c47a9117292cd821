"""The run directory is a contract: one process at a time, a plan (run.json) that a command must fit,
checkpoints loaded only verified and with weights_only=True, records that a restart does not duplicate,
an exit status that tells a stopped run from a finished one, and faults of the disk said plainly.

Every test drives the real entry point (tests/reliability_runs.py: `train_forked`, a forked child
running `trainer.train` as `python -m` does; a fresh `python -m trainer.train` process where a second
real process is the point) on the tiny run of the reliability tests, and compares with its
uninterrupted `reference` run where the outcome must be the same run.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, train_cmd, wandb_files
from tests.reliability_hooks import BALLAST, KILL_ENV, ChildRun, run_forked
from tests.reliability_runs import (
    MAX_STEPS,
    TINY,
    alert_records,
    assert_same_run,
    csv_state,
    run_dir_of,
    train_forked,
)
from trainer.checkpoint_io import CorruptCheckpointError, load_verified, verify_checkpoint
from trainer.lit_gpt import lr_factor
from trainer.run_results import metric_rows


def tiny(steps: int) -> list[str]:
    """TINY with trainer.max_steps=steps in place of its own."""
    return [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={steps}" for a in TINY]


def copy_of(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference run at the same place under a new paths.root: the same command finds it."""
    target = tmp_path / "default" / reference.name
    shutil.copytree(reference, target)
    return target


class Payload:
    """A pickle that runs code when loaded without weights_only: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def crafted_checkpoint(path: Path, marker: Path) -> None:
    """A zip archive torch.save wrote, every CRC valid, whose pickle calls Path.touch(marker) when unpickled."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3, "payload": Payload(marker)}, path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


# --------------------------------------------------------------------------- 1. verified, never executed


def test_every_torch_load_in_the_repository_passes_weights_only_true() -> None:
    calls = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        text = path.read_text()
        start = 0
        while (i := text.find("torch.load(", start)) >= 0:
            end = text.find(")", text.find("\n", i))  # the call's arguments, over one or two lines
            calls.append((path.relative_to(ROOT), text[i:end + 1]))
            start = i + 1
    code_calls = [(p, c) for p, c in calls if p.name != Path(__file__).name]
    assert code_calls, "no torch.load call found: the search is broken"
    assert [(p, c) for p, c in code_calls if "weights_only=True" not in c] == []


@pytest.mark.parametrize("damage", ["crafted_pickle", "truncated"])
def test_a_done_run_with_a_bad_last_checkpoint_is_reported_never_executed(damage: str, reference: Path,
                                                                          corpus_cache: Path, tmp_path: Path) -> None:
    run = copy_of(reference, tmp_path)
    last, marker = run / "checkpoints" / "last.ckpt", tmp_path / "pwned"
    if damage == "crafted_pickle":
        crafted_checkpoint(last, marker)
    else:
        data = last.read_bytes()
        last.write_bytes(data[: len(data) // 2])
    for _ in range(2):  # every rerun, not only the first
        proc = train_forked(tmp_path, corpus_cache, "logger=csv")
        assert proc.returncode == 0, proc.output[-3000:]
        assert f"is DONE at step {MAX_STEPS}; nothing to do" in proc.output
        expected = "cannot be loaded with weights_only=True" if damage == "crafted_pickle" else "is truncated"
        assert f"no objective for {run}" in proc.output and expected in proc.output
    assert not marker.exists() and not (run / "FAILED").exists() and (run / "DONE").exists()


def test_post_training_tools_refuse_a_crafted_checkpoint(reference: Path, tmp_path: Path) -> None:
    from trainer.checkpoints import load_lit_gpt, save_edited
    from trainer.run_results import build_report, model_from_checkpoint

    run = copy_of(reference, tmp_path)
    marker = tmp_path / "pwned"
    crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    for load in (load_verified, model_from_checkpoint, load_lit_gpt):
        with pytest.raises(CorruptCheckpointError, match="cannot be loaded with weights_only=True"):
            load(run / "checkpoints" / "last.ckpt")
    good = load_lit_gpt(run / "checkpoints" / "best.ckpt")
    with pytest.raises(CorruptCheckpointError):
        save_edited(good, run / "checkpoints" / "last.ckpt", tmp_path / "edited.ckpt")
    report = build_report(tmp_path / "default", tmp_path / "report")  # compare_runs: the run is still reported
    assert not report["runs"][0]["kv_cache_bytes"] and report["runs"][0]["val_loss"] is not None
    laser = subprocess.run([*train_cmd()[:2], "trainer.laser", f"ckpt='{run / 'checkpoints' / 'last.ckpt'}'"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert laser.returncode != 0 and "cannot be loaded with weights_only=True" in laser.stderr + laser.stdout
    assert not marker.exists()


# --------------------------------------------------------------------------- 2. one process at a time


def test_a_second_run_of_the_same_command_is_refused_and_a_killed_owner_leaves_no_lock(
        reference: Path, corpus_cache: Path, tmp_path: Path) -> None:
    args = [*TINY, "logger=csv", f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}"]
    slow = ["+callbacks.throttle._target_=tests.test_sweep.Throttle", "+callbacks.throttle.seconds=0.5"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    owner = subprocess.Popen(train_cmd(*args, *slow), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and owner.poll() is None:
            last = next(iter(tmp_path.glob("default/*/checkpoints/last.ckpt")), None)
            if last is not None and verify_step(last) >= 4:
                break
            time.sleep(0.2)
        assert owner.poll() is None, "the first run ended before a second could be started"
        second = train_forked(tmp_path, corpus_cache, "logger=csv", *slow)  # the same command
        assert second.returncode == 2, second.output[-3000:]
        run = run_dir_of(tmp_path)
        assert f"error: {run} is in use by another run (pid {owner.pid})" in second.output
        assert "Traceback" not in second.output and not (run / "FAILED").exists()
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # the owner dies holding the lock
        owner.wait()
    third = train_forked(tmp_path, corpus_cache, "logger=csv", *slow)
    assert third.returncode == 0, third.output[-3000:]
    assert_same_run(reference, run)  # the refused second run touched nothing: alerts, CSV and state as one run's


def verify_step(path: Path) -> int:
    try:
        return verify_checkpoint(path)["global_step"]
    except CorruptCheckpointError:  # mid-write
        return -1


# --------------------------------------------------------------------------- 3. the plan: max_steps and extend_to


def test_max_steps_names_the_run_a_mismatch_is_refused_and_extend_to_continues_it(corpus_cache: Path,
                                                                                 tmp_path: Path) -> None:
    pinned = tmp_path / "pinned"

    def train(steps: int, *extra: str, kill: str | None = None, where: Path | None = pinned) -> ChildRun:
        args = [*tiny(steps), "logger=csv", f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}", *extra]
        if where is not None:
            args.append(f"hydra.run.dir={where}")
        return run_forked(args, env={KILL_ENV: kill} if kill else None)

    # a killed 8-step run, resumed with another max_steps: refused, nothing touched
    assert train(8, kill="6:batch_end").returncode == -9
    before = (pinned / "checkpoints" / "last.ckpt").read_bytes()
    refused = train(12)
    assert refused.returncode == 2, refused.output[-3000:]
    assert (f"error: {pinned} is a run of trainer.max_steps=8 (run.json), and this command says "
            "trainer.max_steps=12") in refused.output and "extend_to=12" in refused.output
    assert (pinned / "checkpoints" / "last.ckpt").read_bytes() == before and not (pinned / "DONE").exists()
    # its own max_steps resumes it; extend_to continues the finished run under the stated schedule
    assert train(8).returncode == 0 and (pinned / "DONE").read_text() == "finished at step 8\n"
    config = (pinned / ".hydra" / "config.yaml").read_text()
    extended = train(8, "extend_to=12")
    assert extended.returncode == 0, extended.output[-3000:]
    assert (f"extending {pinned} from step 8 (planned: 8) to 12 steps: from here the learning rate follows the "
            "warmup + cosine schedule of a 12-step run") in extended.output
    assert (pinned / "DONE").read_text() == "finished at step 12\n"
    assert verify_checkpoint(pinned / "checkpoints" / "last.ckpt")["global_step"] == 12
    plan = json.loads((pinned / "run.json").read_text())
    assert plan["max_steps"] == 8 and [(e["from_step"], e["to"]) for e in plan["extensions"]] == [(8, 12)]
    assert (pinned / ".hydra" / "config.yaml").read_text() == config  # the config the run started with
    peak = 3e-3
    lrs = {int(r["step"]): r["train/lr"] for r in metric_rows(pinned) if "train/lr" in r}
    for step, lr in lrs.items():
        total = 8 if step < 8 else 12
        assert lr == pytest.approx(peak * lr_factor(step, 4, total, 0.1), rel=1e-6), (step, lr)
    assert {s for s in lrs if s >= 8} == {8, 9, 10, 11}  # the steps of the extension, labelled as such
    # rerunning either command now has nothing to do; a shorter extension or one of a new run is refused
    for extra in ((), ("extend_to=12",)):
        again = train(8, *extra)
        assert again.returncode == 0 and "is DONE at step 12; nothing to do" in again.output
    shorter = train(8, "extend_to=10")
    assert shorter.returncode == 2 and f"extend_to=10 is below the 12 steps {pinned} is planned for" in shorter.output
    new = train(8, "extend_to=12", where=tmp_path / "new")
    assert new.returncode == 2 and "extend_to=12 continues an existing run" in new.output
    assert not (tmp_path / "new").exists()
    # without a pinned directory, max_steps is part of the run's name: a try-out never blocks the long run
    assert train(4, where=None).returncode == 0 and train(6, where=None).returncode == 0
    runs = sorted((tmp_path / "default").iterdir())  # (long names end in a hash of the overrides)
    assert sorted(json.loads((r / "run.json").read_text())["max_steps"] for r in runs) == [4, 6]
    assert all((r / "DONE").exists() for r in runs)


# --------------------------------------------------------------------------- 4. records once


def test_a_kill_before_the_first_checkpoint_restarts_without_duplicate_records(corpus_cache: Path,
                                                                              tmp_path: Path) -> None:
    """A spike planted at step 2 alerts at the step-4 check; the kill comes while the first last.ckpt is
    being written, after alerts.jsonl got its line. The rerun starts from scratch and records it once."""
    args = [a if a != "+callbacks.spike.step=6" else "+callbacks.spike.step=2" for a in TINY]
    args += ["logger=csv", f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}"]
    assert run_forked(args, env={KILL_ENV: "4:in_save"}).returncode == -9
    run = run_dir_of(tmp_path)
    assert [a["step"] for a in alert_records(run)] == [4] and not (run / "checkpoints" / "last.ckpt").exists()
    proc = run_forked(args)
    assert proc.returncode == 0, proc.output[-3000:]
    assert "resume from scratch" in proc.output
    steps = [(a["step"], a["rule"]) for a in alert_records(run)]
    assert steps.count((4, "spikes")) == 1 and len(steps) == len(set(steps))  # before: 4, ..., 4, ...
    logged = [json.loads(line)["step"] for line in (run / "logits.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged))


def test_resume_never_moves_the_old_run_aside_and_starts_clean(reference: Path, corpus_cache: Path,
                                                               tmp_path: Path) -> None:
    run = copy_of(reference, tmp_path)
    proc = train_forked(tmp_path, corpus_cache, "logger=csv", "resume=never")
    assert proc.returncode == 0, proc.output[-3000:]
    aside = run.with_name(f"{run.name}.previous-1")
    assert f"resume=never: the earlier contents of {run} are now in {aside}" in proc.output
    assert_same_run(reference, run)
    assert_same_run(reference, aside)  # kept whole
    assert "Restoring states" not in proc.output


# --------------------------------------------------------------------------- 6. torn files, full disks


def test_a_torn_csv_row_and_an_empty_failed_file_are_survived(reference: Path, corpus_cache: Path,
                                                              tmp_path: Path) -> None:
    assert train_forked(tmp_path, corpus_cache, "logger=csv", kill="6:batch_end").returncode == -9
    run = run_dir_of(tmp_path)
    metrics = run / "csv" / "metrics.csv"
    with open(metrics, "a") as f:
        f.write("0,abc,7.1")  # the half-written row of a crash mid-write (no newline)
    assert metric_rows(run)  # no TypeError on the torn row
    (run / "FAILED").write_text("")  # an attempt that died before writing its reason
    proc = train_forked(tmp_path, corpus_cache, "logger=csv")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "ends in a partial row (9 bytes, a crash mid-write): dropped" in proc.output
    assert "no reason recorded" in proc.output and not (run / "FAILED").exists()
    assert_same_run(reference, run)  # train/batches, train/samples, train/lengths included: totals continue
    tokens = {s: float(v) for (s, k), v in csv_state(run).items() if k == "train/lengths"}
    assert tokens[max(tokens)] == (max(tokens) + 1) * 4 * 32  # every batch of 4 x 32 tokens counted once


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A real 24 MB tmpfs mounted at tmp_path/disk (skipped where mounting is not allowed)."""
    target = tmp_path / "disk"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(target)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_disk_that_fills_mid_run_ends_with_a_message_and_resumes(tmpfs: Path, reference: Path,
                                                                   corpus_cache: Path) -> None:
    """(A filesystem the kernel turns read-only fails writes with EROFS, handled the same way; it cannot be
    staged here: remounting read-only is refused while the run holds files open for writing.)"""
    run = tmpfs / "run"

    def hook(step: int) -> list[str]:
        return ["+callbacks.fault._target_=tests.reliability_hooks.DiskFaultAt", f"+callbacks.fault.step={step}",
                f"+callbacks.fault.path={tmpfs}", f"hydra.run.dir={run}"]

    proc = train_forked(tmpfs, corpus_cache, "logger=csv", *hook(6))
    assert proc.returncode == 4, proc.output[-3000:]
    (error,) = [line for line in proc.output.splitlines() if line.startswith("error: ")]
    assert f"writing to {run} failed" in error and "the last one is intact" in error
    assert "rerun the same command to resume" in error and "Traceback" not in proc.output
    (tmpfs / BALLAST).unlink()
    again = train_forked(tmpfs, corpus_cache, "logger=csv", *hook(-1))  # space is back: no fault this time
    assert again.returncode == 0, again.output[-3000:]
    assert_same_run(reference, run)


# --------------------------------------------------------------------------- 8. smaller contracts


def test_deleting_the_wandb_directory_mid_run_is_warned(corpus_cache: Path, tmp_path: Path) -> None:
    pinned = tmp_path / "run"
    proc = train_forked(tmp_path, corpus_cache, "callbacks.wandb_watch.every_n_steps=2", f"hydra.run.dir={pinned}",
                        "+callbacks.rm._target_=tests.reliability_hooks.DeleteWandbAt", "+callbacks.rm.step=5",
                        f"+callbacks.rm.run_dir={pinned}")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "step 6: the W&B run directory" in proc.output and "was deleted while training" in proc.output
    assert proc.output.count("was deleted while training") == 1 and not wandb_files(pinned)
