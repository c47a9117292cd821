"""The run directory: a pure function of (experiment name, overrides), never a timestamp.

Layout:
    checkpoints/last.ckpt   latest state (resume point)
    checkpoints/last.prev.ckpt  the state it replaced (fallback if last.ckpt is damaged)
    wandb_run_id            the W&B run id, reused on resume
    alerts.jsonl            spectral alerts (written by the spectral callback)
    logits.jsonl            per-head max logit, entropy and logit bound of each logit check
    spectra/                spectral history as arrays
    DONE                    written when training finished
"""

import json
import logging
import os
import re
import secrets
import shutil
import string
from hashlib import sha1
from pathlib import Path

from trainer.checkpoint_io import CorruptCheckpointError, previous_path, temporary_files, verify_checkpoint

log = logging.getLogger(__name__)

RESUME_POLICIES = ("auto", "never", "must")
CORRUPT_SUFFIX = ".corrupt"


class NoUsableCheckpointError(FileNotFoundError):
    """Resuming was asked for, but no checkpoint of the run directory verifies."""


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
        return self.path / "alerts.jsonl"

    @property
    def logits_file(self) -> Path:
        return self.path / "logits.jsonl"

    @property
    def spectra_dir(self) -> Path:
        return self.path / "spectra"

    def is_done(self) -> bool:
        return self.done_file.exists()

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
            return None
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
        """Drop the records of checks after `step`: alerts.jsonl and logits.jsonl lines, spectra/step*.npz.

        A resumed run repeats the checks after its checkpoint and writes their records again, so
        each alert is recorded once. Metric logs are append-only: W&B history cannot be edited and
        csv/metrics.csv is kept whole, so the steps a resumed run repeats appear twice there; the
        later row of a step is the one that counts.
        """
        for records in (self.alerts_file, self.logits_file):
            if records.exists():
                lines = records.read_text().splitlines()
                keep = [line for line in lines if line.strip() and _json_step(line) <= step]
                if len(keep) != len(lines):
                    _write_atomic(records, "".join(f"{line}\n" for line in keep))
        if self.spectra_dir.is_dir():
            for f in self.spectra_dir.glob("step*.npz"):
                if int(f.stem.removeprefix("step")) > step:
                    f.unlink()

    def wandb_run_id(self) -> str:
        """The stored W&B run id; a new random one (8 of [a-z0-9], W&B's format) is stored first."""
        if not self.wandb_id_file.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            alphabet = string.ascii_lowercase + string.digits
            self.wandb_id_file.write_text("".join(secrets.choice(alphabet) for _ in range(8)) + "\n")
        return self.wandb_id_file.read_text().strip()

    def mark_done(self) -> None:
        self.done_file.write_text("finished\n")

    def discard_if_unused(self) -> None:
        """Remove a directory holding nothing but Hydra's own files (a run that never started),
        and its experiment directory if that is left empty."""
        if not self.path.is_dir():
            return
        leftovers = [p for p in self.path.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
        if not leftovers:
            shutil.rmtree(self.path)
            if not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


def _json_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return -1  # keep lines that are not records of a step


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
