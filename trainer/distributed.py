"""Which process this is, and how a multirun's jobs get a single run's process environment.

Lightning's DDP launcher starts ranks > 0 by re-executing `sys.argv`; torchrun, SLURM and
submitit start every rank themselves. These helpers read the launchers' variables and undo what a
DDP job leaves behind in a process that goes on to run the next job of a multirun.
"""

import os
from collections.abc import Sequence

import torch

# Hydra flags that take a value as the next argument (kept when a DDP child's command is rebuilt)
_VALUE_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
# what Lightning's DDP launcher puts in rank 0's environment (LOCAL_RANK would make the next job
# of a multirun believe its ranks are started externally, and wait for them)
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_global_zero() -> bool:
    """Whether this process is global rank 0, from the launchers' environment (True when not
    distributed): every rank variable present is 0. Lightning sets LOCAL_RANK (and NODE_RANK) for
    the ranks it starts; torchrun sets RANK; SLURM, and so submitit, sets SLURM_PROCID per task."""
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def single_run_argv(argv: Sequence[str], task_overrides: Sequence[str]) -> list[str]:
    """The command line that runs one job of a multirun on its own.

    Lightning's DDP launcher starts ranks > 0 by re-executing `sys.argv` (plus `hydra.run.dir`);
    in a multirun that is the whole sweep command. This keeps the program and Hydra's config-path
    flags, drops -m/--multirun and the sweep's overrides, and puts in the job's own overrides and
    `hydra.mode=RUN` (a sweep preset may set MULTIRUN).
    """
    out, rest, keep_next = [argv[0]], list(argv[1:]), False
    for arg in rest:
        if keep_next:
            out.append(arg)
            keep_next = False
        elif arg in ("-m", "--multirun"):
            continue
        elif arg.startswith("-"):
            out.append(arg)
            keep_next = arg in _VALUE_FLAGS
    return [*out, *task_overrides, "hydra.mode=RUN"]


def end_distributed(env: dict[str, str | None]) -> None:
    """After a DDP job of a multirun: leave the process group (Lightning keeps it, and the next
    job would reuse it with the old job's ranks gone) and restore the rendezvous variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for var, value in env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
