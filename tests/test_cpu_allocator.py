"""The CPU allocator setting: freed activations stay in the process, so steps stop page-faulting."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from callbacks.cpu_allocator import RetainFreedHeap
from tests.conftest import ROOT, compose_train, run_train

STEP_FAULTS = """
import resource, sys, torch
from callbacks.cpu_allocator import retain_freed_heap
from models import GPT, GPTConfig
torch.manual_seed(0)
if sys.argv[1] == "retain":
    assert retain_freed_heap(1024)
model = GPT(GPTConfig(vocab_size=2048, block_size=128))  # the default tiny model
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
idx = torch.randint(0, 2048, (16, 128))
def step():
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def step_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_retained_heap_removes_the_per_step_page_faults() -> None:
    default, retained = step_faults("default"), step_faults("retain")
    assert default > 2000, default  # glibc trims the freed activations and faults them back every step
    assert retained < default / 4, (default, retained)


def test_default_callbacks_include_it(tmp_path: Path) -> None:
    cfg = compose_train(["logger=csv"], tmp_path / "run")
    callbacks = instantiate(cfg.callbacks)
    assert isinstance(callbacks["cpu_allocator"], RetainFreedHeap)
    assert callbacks["cpu_allocator"].top_pad_mb == 1024


def test_negative_pad_is_refused_before_any_work(tmp_path: Path) -> None:
    proc = run_train("callbacks.cpu_allocator.top_pad_mb=-1", f"paths.root={tmp_path}")
    assert proc.returncode == 2
    assert "callbacks.cpu_allocator.top_pad_mb must be >= 0" in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
