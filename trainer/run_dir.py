"""The run directory: a pure function of (experiment name, overrides), never a timestamp.

Layout:
    checkpoints/last.ckpt   latest state (resume point)
    checkpoints/last.prev.ckpt  the state it replaced (fallback if last.ckpt is damaged)
    wandb_run_id            the W&B run id, reused on resume
    alerts.jsonl            spectral alerts (written by the spectral callback)
    logits.jsonl            per-head max logit, entropy and logit bound of each logit check
    spectra/                spectral history as arrays
    run.json                the plan: trainer.max_steps the run was started with, and its extensions
    .hydra/                 the composed config the run was started with (written once, never replaced)
    .lock                   held (fcntl) by the process training in the directory
    DONE                    written when training finished

One process at a time: `lock` refuses a second one, and a killed owner's lock goes with its
process. `plan` keeps the learning-rate schedule a property of the directory: a command whose
trainer.max_steps differs from run.json's is refused, `extend_to` continues a run to more steps.
"""

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import string
import time
from hashlib import sha1
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from analysis.files import write_json, write_text
from analysis.spectral.history import ALERTS_FILE, CHECK_GLOB, LOGITS_FILE, SPECTRA_DIR, check_step
from trainer.checkpoint_io import CorruptCheckpointError, previous_path, temporary_files, verify_checkpoint

log = logging.getLogger(__name__)

RESUME_POLICIES = ("auto", "never", "must")
CORRUPT_SUFFIX = ".corrupt"


class NoUsableCheckpointError(FileNotFoundError):
    """Resuming was asked for, but no checkpoint of the run directory verifies."""


class RunDirectoryError(ValueError):
    """The command cannot use this run directory as it stands (in use, or planned differently)."""


def run_id_from_overrides(override_dirname: str) -> str:
    """A readable, filesystem-safe directory name for a set of overrides ("default" if none).

    `override_dirname` is Hydra's `k1=v1,k2=v2` (sorted, with excluded keys removed). Path
    separators and odd characters become '-', and a long name keeps a hash of the full string.
    """
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "-", override_dirname)
    if len(name) > 120:
        name = f"{name[:100]}-{sha1(override_dirname.encode()).hexdigest()[:12]}"
    return name


class RunDirectory:
    """Paths and markers of one run; creating it is cheap and touches nothing on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.resume_step = 0  # the global step of the checkpoint `resume_checkpoint` chose
        self._lock_fd: int | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    @property
    def done_file(self) -> Path:
        return self.path / "DONE"

    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb_run_id"

    @property
    def alerts_file(self) -> Path:
        return self.path / ALERTS_FILE

    @property
    def logits_file(self) -> Path:
        return self.path / LOGITS_FILE

    @property
    def spectra_dir(self) -> Path:
        return self.path / SPECTRA_DIR

    @property
    def plan_file(self) -> Path:
        return self.path / "run.json"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def config_dir(self) -> Path:
        return self.path / ".hydra"

    def is_done(self) -> bool:
        return self.done_file.exists()

    # ----------------------------------------------------------------- one process at a time
    def lock(self) -> None:
        """Hold an exclusive `fcntl` lock on .lock until this process ends (or `unlock`).

        Raises RunDirectoryError naming the owner's pid when another process holds it. The
        kernel drops the lock with its owner, so a SIGKILLed run leaves nothing stuck.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryError(
                f"{self.path} is in use by another run (pid {owner}); wait for it to end, or give this run "
                "another experiment_name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.unlock()  # a lock held before (move_aside: on the .lock that moved away) goes now
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def move_aside(self) -> Path | None:
        """Move the directory's contents to <dir>.previous-<k> (resume=never: a clean start that deletes
        nothing); return where they went, or None when there was nothing but this process's own log.

        The caller holds the lock: it is taken again on the fresh directory, and open log files
        inside it (Hydra's <job>.log) are reopened there.
        """
        if not self.path.is_dir() or not self._leftovers():
            return None
        k = 1
        while (aside := self.path.with_name(f"{self.path.name}.previous-{k}")).exists():
            k += 1
        held = self._lock_fd is not None
        os.replace(self.path, aside)
        self.path.mkdir(parents=True)
        if held:
            self.lock()
        _reopen_logs(self.path)
        return aside

    # ----------------------------------------------------------------- the plan
    def read_plan(self) -> dict[str, Any] | None:
        """run.json: {"max_steps": first plan, "extensions": [{"from_step", "to", "time"}, ...]}."""
        try:
            return json.loads(self.plan_file.read_text())
        except FileNotFoundError:
            return None

    def planned_steps(self) -> int | None:
        """The steps the run is planned for now: its last extension's, else its first plan's."""
        return _planned(self.read_plan())

    def plan(self, max_steps: int, extend_to: int | None) -> int:
        """The steps this command trains to; raises RunDirectoryError, before anything is written,
        when it does not fit the run's plan (run.json).

        - a new run is planned for `max_steps` (extend_to is refused: there is nothing to extend);
        - an existing run must be asked for the trainer.max_steps it was started with: the
          learning-rate schedule depends on it, so another value is another run;
        - `extend_to` >= the planned steps continues the run to that many steps: from the step it
          has reached, the learning rate follows the warmup + cosine schedule of an
          `extend_to`-step run (the warmup is long over; the cosine is stretched to the new end).
        """
        first = self.read_plan()
        if first is None:
            if extend_to is not None:
                raise RunDirectoryError(
                    f"extend_to={extend_to} continues an existing run, and {self.path} holds none; "
                    f"for a new run set trainer.max_steps={extend_to}")
            return max_steps
        planned = _planned(first)
        if max_steps != first["max_steps"]:
            now = f", extended to {planned}" if planned != first["max_steps"] else ""
            raise RunDirectoryError(
                f"{self.path} is a run of trainer.max_steps={first['max_steps']}{now} (run.json), and this "
                f"command says trainer.max_steps={max_steps}: the learning-rate schedule follows max_steps, so "
                f"that is another run. To continue this one to {max_steps} steps pass "
                f"trainer.max_steps={first['max_steps']} extend_to={max_steps}; to start over pass resume=never")
        if extend_to is None or extend_to == planned:
            return planned
        if extend_to < planned:
            raise RunDirectoryError(f"extend_to={extend_to} is below the {planned} steps {self.path} is planned "
                                    f"for; allowed: extend_to >= {planned}")
        return extend_to

    def record_plan(self, max_steps: int, step: int) -> None:
        """Write run.json for a run planned for `max_steps` that stands at `step` (a new run, or an extension)."""
        plan = self.read_plan()
        if plan is None:
            plan = {"max_steps": max_steps, "extensions": []}
        elif max_steps != _planned(plan):
            plan["extensions"].append({"from_step": step, "to": max_steps, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        else:
            return
        write_json(self.plan_file, plan)

    def record_config(self, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
        """.hydra/config.yaml, hydra.yaml and overrides.yaml, as Hydra writes them, once: a rerun
        (resume, DONE, extension) keeps the config the run started with."""
        if (self.config_dir / "config.yaml").exists():
            return
        self.config_dir.mkdir(parents=True, exist_ok=True)
        for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                           ("overrides.yaml", hydra_cfg.overrides.task)):
            write_text(self.config_dir / name, OmegaConf.to_yaml(node))

    def resume_checkpoint(self, policy: str) -> str | None:
        """The verified checkpoint to resume from under `policy` (auto | never | must).

        auto and must take checkpoints/last.ckpt when it verifies (trainer/checkpoint_io.py). A
        truncated or corrupted last.ckpt is reported, moved aside to last.ckpt.corrupt, and the
        newest other checkpoint that verifies is used instead (last.prev.ckpt, best.ckpt,
        alert-step*.ckpt, diverged-step*.ckpt); with none, NoUsableCheckpointError says what to do.
        auto starts from scratch only when the run has no checkpoint at all; must never does.
        Records written after the chosen checkpoint (see `rewind`) are dropped, because the
        resumed run writes them again.
        """
        if policy not in RESUME_POLICIES:
            raise ValueError(f"resume={policy!r} is invalid; allowed: {list(RESUME_POLICIES)}")
        if policy == "never":
            return None
        for tmp in temporary_files(self.checkpoint_dir):  # an interrupted write: the target is intact
            tmp.unlink(missing_ok=True)
        chosen, step = self._usable_checkpoint()
        if chosen is None:
            if policy == "must":
                raise FileNotFoundError(f"resume=must but {self.last_checkpoint} does not exist")
            self.rewind(-1)  # a session killed before its first checkpoint: its records go, the run starts over
            return None
        self.resume_step = step
        self.rewind(step)
        return str(chosen)

    def _usable_checkpoint(self) -> tuple[Path | None, int]:
        """The newest checkpoint that verifies, preferring last.ckpt; (None, 0) if there are none."""
        if self.last_checkpoint.exists():
            try:
                return self.last_checkpoint, verify_checkpoint(self.last_checkpoint)["global_step"]
            except CorruptCheckpointError as e:
                aside = self.last_checkpoint.with_name(self.last_checkpoint.name + CORRUPT_SUFFIX)
                os.replace(self.last_checkpoint, aside)
                log.error("damaged checkpoint: %s; moved it to %s", e, aside)
                problem = str(e)
        else:
            problem = f"{self.last_checkpoint} does not exist"
        others = sorted(self.checkpoint_dir.glob("*.ckpt")) if self.checkpoint_dir.is_dir() else []
        if not others and not self.last_checkpoint.with_name(self.last_checkpoint.name + CORRUPT_SUFFIX).exists():
            return None, 0  # a run that never wrote a checkpoint
        good: list[tuple[int, Path]] = []
        for path in others:
            try:
                good.append((verify_checkpoint(path)["global_step"], path))
            except CorruptCheckpointError as e:
                log.warning("fallback candidate skipped: %s", e)
        if not good:
            raise NoUsableCheckpointError(
                f"{problem} and no other checkpoint in {self.checkpoint_dir} verifies; nothing to resume from. "
                "Start again with resume=never (the damaged files stay for inspection)"
            )
        step, path = max(good, key=lambda sp: (sp[0], sp[1] == previous_path(self.last_checkpoint)))
        log.warning("%s; resuming from %s (step %d), the newest checkpoint that verifies", problem, path, step)
        return path, step

    def rewind(self, step: int) -> None:
        """Drop the records of checks after `step`: alerts.jsonl and logits.jsonl lines, spectra/step*.npz
        (and a line that is not a record at all: the torn last line of a write a crash cut short).

        A resumed run repeats the checks after its checkpoint and writes their records again, so
        each alert is recorded once. Metric logs are append-only: W&B history cannot be edited and
        csv/metrics.csv is kept whole, so the steps a resumed run repeats appear twice there; the
        later row of a step is the one that counts.
        """
        for records in (self.alerts_file, self.logits_file):
            if records.exists():
                lines = records.read_text(errors="replace").splitlines()
                keep = [line for line in lines if line.strip() and -1 < _json_step(line) <= step]
                if len(keep) != len(lines):
                    write_text(records, "".join(f"{line}\n" for line in keep))
        if self.spectra_dir.is_dir():
            for f in self.spectra_dir.glob(CHECK_GLOB):
                if check_step(f) > step:
                    f.unlink()

    def wandb_run_id(self) -> str:
        """The stored W&B run id; a new random one (8 of [a-z0-9], W&B's format) is stored first."""
        if not self.wandb_id_file.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            alphabet = string.ascii_lowercase + string.digits
            self.wandb_id_file.write_text("".join(secrets.choice(alphabet) for _ in range(8)) + "\n")
        return self.wandb_id_file.read_text().strip()

    def mark_done(self, step: int) -> None:
        self.done_file.write_text(f"finished at step {step}\n")

    def unmark_done(self) -> None:
        self.done_file.unlink(missing_ok=True)

    def _leftovers(self) -> list[Path]:
        """What the directory holds besides Hydra's log and the lock: a run's files."""
        return [p for p in self.path.iterdir() if p.suffix != ".log" and p.name != self.lock_file.name]

    def discard_if_unused(self) -> None:
        """Remove a directory holding nothing but Hydra's log and the lock (a run that never started),
        and its experiment directory if that is left empty."""
        if not self.path.is_dir() or self._leftovers():
            return
        self.unlock()
        shutil.rmtree(self.path)
        if not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def _planned(plan: dict[str, Any] | None) -> int | None:
    """The steps a run.json plan stands at: its last extension's, else its first plan's (None: no plan)."""
    if plan is None:
        return None
    return int(plan["extensions"][-1]["to"]) if plan.get("extensions") else int(plan["max_steps"])


def _json_step(line: str) -> int:
    """The step of a JSON-lines record; -1 for a line that is not one (torn, or without a step)."""
    try:
        return int(json.loads(line).get("step", -1))
    except (ValueError, AttributeError, TypeError):
        return -1


def _reopen_logs(directory: Path) -> None:
    """Close the logging file handlers whose file is in `directory` (it was moved away while open):
    a FileHandler in append mode opens its file again, there, at its next record."""
    loggers = [logging.root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    where = Path(os.path.abspath(directory))
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == where:
            handler.close()


