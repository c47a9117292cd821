"""Keep freed activation memory in the process on CPU, instead of handing it back to the kernel.

A training step allocates and frees the same activations every step. glibc's malloc returns the
freed top of its heap to the kernel (trim) once it exceeds a threshold, so the next step takes
those pages back one page fault at a time, zero-filled by the kernel. On the default tiny run that
is about 40,000 minor faults per step and 10-20% of the step's wall time. `mallopt(M_TOP_PAD)`
makes every heap extension and every trim keep `top_pad_mb` of slack: after the first steps the
activations are reused without a fault (measured: 40,612 -> 4,638 faults per step; the default
Lightning run 9,400 -> 11,500 tokens/s on 2 cores; peak RSS +4%). Other allocators (macOS,
musl) are left as they are.
"""

import ctypes
import ctypes.util
import logging
import sys

import lightning as L

log = logging.getLogger(__name__)

M_TOP_PAD = -2  # mallopt parameter number, glibc <malloc.h>


def retain_freed_heap(top_pad_mb: int) -> bool:
    """Set glibc's M_TOP_PAD to `top_pad_mb` MiB; True if set, False where malloc is not glibc's."""
    if top_pad_mb < 0:
        raise ValueError(f"top_pad_mb must be >= 0, got {top_pad_mb}")
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_TOP_PAD, top_pad_mb << 20))


class RetainFreedHeap(L.Callback):
    """On a CPU run, call `retain_freed_heap(top_pad_mb)` once at setup (a process-wide setting)."""

    def __init__(self, top_pad_mb: int = 1024) -> None:
        super().__init__()
        if top_pad_mb < 0:
            raise ValueError(f"callbacks.cpu_allocator.top_pad_mb must be >= 0, got {top_pad_mb}")
        self.top_pad_mb = top_pad_mb

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        if retain_freed_heap(self.top_pad_mb):
            log.info("glibc malloc keeps %d MiB of freed heap (M_TOP_PAD)", self.top_pad_mb)
