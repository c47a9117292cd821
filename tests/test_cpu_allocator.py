"""The CPU allocator setting: freed activations stay in the process, so steps stop page-faulting."""

import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate

from callbacks.cpu_allocator import RetainFreedHeap
from tests.conftest import ROOT, compose_train, run_train

HEAP_AFTER_FREE = """
import ctypes, sys
from callbacks.cpu_allocator import retain_freed_heap

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert retain_freed_heap(1024)
blocks = [libc.malloc(64 * 1024) for _ in range(1600)]  # 100 MiB in heap-sized (below mmap threshold) blocks
grown = libc.mallinfo2().arena
for b in reversed(blocks):
    libc.free(b)
print(grown >> 20, libc.mallinfo2().arena >> 20)  # heap MiB before and after the frees
"""


def heap_mib_released_by_free(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", HEAP_AFTER_FREE, mode], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown, after = proc.stdout.split()
    return int(grown) - int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_freed_activations_stay_in_the_heap() -> None:
    """glibc gives a freed heap top back to the kernel (to be faulted in again next step); retained, it stays."""
    assert heap_mib_released_by_free("default") >= 90  # of the 100 MiB freed
    assert heap_mib_released_by_free("retain") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_default_callbacks_set_it_on_a_cpu_trainer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_train(["logger=csv"], tmp_path / "run")
    callback = instantiate(cfg.callbacks)["cpu_allocator"]
    assert isinstance(callback, RetainFreedHeap) and callback.top_pad_mb == 1024
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="callbacks.cpu_allocator"):
        callback.setup(trainer, L.LightningModule(), "fit")
    assert "glibc malloc keeps 1024 MiB of freed heap" in caplog.text


@pytest.mark.parametrize("value", [-1, 4096])  # 4096 MiB would overflow mallopt's C int
def test_out_of_range_pad_is_refused_before_any_work(tmp_path: Path, value: int) -> None:
    proc = run_train(f"callbacks.cpu_allocator.top_pad_mb={value}", f"paths.root={tmp_path}")
    assert proc.returncode == 2
    assert f"callbacks.cpu_allocator.top_pad_mb must be in [0, 2047] (MiB), got {value}" in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
