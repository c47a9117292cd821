"""Keep freed activation memory in the process on CPU, instead of handing it back to the kernel.

A training step allocates and frees the same activations every step. glibc's malloc returns the
freed top of its heap to the kernel (trim), so the next step takes those pages back one minor
page fault at a time, each zero-filled by the kernel. `mallopt(M_TOP_PAD)` makes every heap
extension and trim keep `top_pad_mb` of slack, so after the first steps the activations reuse
resident pages (the README's Performance section has the measured minor faults and throughput).
Other allocators (macOS, musl) are left as they are.
"""

import ctypes
import ctypes.util
import logging
import sys

import lightning as L

log = logging.getLogger(__name__)

M_TOP_PAD = -2  # mallopt parameter number, glibc <malloc.h>
MAX_TOP_PAD_MB = 2047  # mallopt takes a C int of bytes


def check_top_pad_mb(top_pad_mb: int, key: str = "top_pad_mb") -> None:
    """Raise ValueError naming `key` unless 0 <= top_pad_mb <= MAX_TOP_PAD_MB."""
    if not 0 <= top_pad_mb <= MAX_TOP_PAD_MB:
        raise ValueError(f"{key} must be in [0, {MAX_TOP_PAD_MB}] (MiB), got {top_pad_mb}")


def retain_freed_heap(top_pad_mb: int) -> bool:
    """Set glibc's M_TOP_PAD to `top_pad_mb` MiB; True if set, False where malloc is not glibc's."""
    check_top_pad_mb(top_pad_mb)
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
        check_top_pad_mb(top_pad_mb, "callbacks.cpu_allocator.top_pad_mb")  # at instantiation: before any work
        self.top_pad_mb = top_pad_mb

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        if retain_freed_heap(self.top_pad_mb):
            log.info("glibc malloc keeps %d MiB of freed heap (M_TOP_PAD)", self.top_pad_mb)
