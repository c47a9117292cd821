"""Resumable sweeps: the real `python -m trainer.train +sweep=...` multirun, killed and rerun.

Rerunning the same sweep command skips DONE jobs, resumes killed ones from their last.ckpt with
their own W&B run ids and starts missing ones; a job that raises is recorded FAILED while the
others finish, and is retried by the rerun (trainer/sweep.py, conf/sweep/, conf/hydra/default.yaml).
"""

import hashlib
import html.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf

from analysis.study import compare
from scripts import compare_runs
from tests.conftest import CONF, ROOT, wandb_files
from tests.png_checks import assert_png_of
from trainer.corpus import kjv_path
from trainer.sweep import single_run_argv, summarize
from trainer.wandb_records import history, read_records, run_id

SMALL = ("trainer=debug", "data.batch_size=8", "data.block_size=64", "data.val_batches=1", "module.sample_tokens=0")
FAST = (*SMALL, "spectral=off")


class ReportPage(html.parser.HTMLParser):
    """The title, table rows (cell texts) and image sources of the sweep report's index.html."""

    def __init__(self) -> None:
        super().__init__()
        self.title, self.rows, self.images, self._tag = "", [], [], None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag: str) -> None:
        self._tag = None

    def handle_data(self, data: str) -> None:
        if self._tag == "title":
            self.title += data
        elif self.rows and self.rows[-1] and self._tag in ("td", "th", "code"):
            self.rows[-1][-1] += data


class Throttle(L.Callback):
    """A test hook (+callbacks.throttle._target_=tests.test_sweep.Throttle): a pause after every
    training batch, so that a job lasts long enough on a fast machine to be killed in its middle."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


def sweep_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", *overrides]


def env() -> dict[str, str]:
    # One intra-op thread: the 2 cores are shared, and oversubscribed OpenMP threads run 3x slower.
    # W&B flushes a run's .wandb file every 15 s by default: every 1 s lets a session killed early
    # still show its run record.
    return {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1",
            "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "1"}


def run_sweep(*overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(*overrides), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def job_dir(sweep_dir: Path, override: str) -> Path:
    """The directory of the sweep's job that has `override` (from the overrides Hydra saved)."""
    (found,) = [f.parent.parent for f in sweep_dir.glob("*/.hydra/overrides.yaml")
                if override in OmegaConf.load(f)]
    return found


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def fingerprint(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest()


def run_record(wandb_file: Path):
    (run,) = [r.run for r in read_records(wandb_file) if r.WhichOneof("record_type") == "run"]
    return run


def test_killed_sweep_resumes_skips_done_and_starts_missing(tmp_path: Path, corpus_cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("+sweep=attention_variants", "attention=mha,gqa,kv_shift", *SMALL, "trainer.max_steps=12",
            "trainer.val_check_interval=6", "callbacks.last_checkpoint.every_n_train_steps=2",
            "callbacks.throughput.window_size=2", "spectral.every_n_steps=6", "spectral.mc_draws=200",
            "+callbacks.throttle._target_=tests.test_sweep.Throttle",  # >= 0.3 s a step: room to kill mid-job
            f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    sweep_dir = tmp_path / "attention_variants"
    proc = subprocess.Popen(sweep_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:  # in the middle of the second job, once W&B has recorded its run
            second = job_dir(sweep_dir, "attention=gqa")
            if checkpoint_step(second / "checkpoints" / "last.ckpt") >= 4 and run_id(wandb_files(second)[0]):
                break
        except Exception:  # not there yet, or mid-write
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before its second job could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the sweep, W&B's service
    proc.wait()

    mha, gqa = job_dir(sweep_dir, "attention=mha"), job_dir(sweep_dir, "attention=gqa")
    killed_at = checkpoint_step(gqa / "checkpoints" / "last.ckpt")
    assert (mha / "DONE").exists() and not (gqa / "DONE").exists() and 4 <= killed_at < 12
    assert len(list(sweep_dir.glob("*/.hydra"))) == 2  # the third job never started
    untouched = {p: fingerprint(p) for p in (mha / "DONE", mha / "checkpoints" / "last.ckpt", *wandb_files(mha))}
    gqa_id = (gqa / "wandb_run_id").read_text().strip()

    again = run_sweep(*args)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    kv = job_dir(sweep_dir, "attention=kv_shift")

    # the first job is skipped: nothing of it rewritten, no new W&B session
    assert f"{mha} is DONE at step 12; nothing to do" in out
    assert {p: fingerprint(p) for p in untouched} == untouched and len(wandb_files(mha)) == 1
    # the second resumes from its checkpoint, in its own W&B run
    assert f"resume from {gqa / 'checkpoints' / 'last.ckpt'}" in out
    assert checkpoint_step(gqa / "checkpoints" / "last.ckpt") == 12
    first, second = wandb_files(gqa)
    assert run_id(first) == run_id(second) == gqa_id
    steps = [r["trainer/global_step"] for r in history(second) if "train/loss" in r]
    assert steps and min(steps) >= killed_at  # continued, did not restart
    # the third runs; every job ends DONE, each in its own W&B run, grouped by sweep, tagged by variant
    assert all((d / "DONE").exists() for d in (mha, gqa, kv))
    ids = {name: run_id(wandb_files(d)[0]) for name, d in (("mha", mha), ("gqa", gqa), ("kv_shift", kv))}
    assert len(set(ids.values())) == 3
    for name, d in (("mha", mha), ("gqa", gqa), ("kv_shift", kv)):
        run = run_record(wandb_files(d)[-1])
        assert run.run_group == "attention_variants"
        assert {"sweep=attention_variants", f"attention={name}", "seed=1337"} <= set(run.tags)
        assert run.display_name == f"attention_variants/{d.name}"

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    print(f"killed at step {killed_at}; run ids {ids}; job seconds {[j['seconds'] for j in summary['jobs']]}")
    assert summary["sweep"] == "attention_variants" and summary["finished"] is not None
    assert summary["counts"] == {"done": 2, "skipped": 1, "failed": 0, "incomplete": 0}
    assert [(j["dir"], j["status"]) for j in summary["jobs"]] == [
        (mha.name, "skipped"), (gqa.name, "done"), (kv.name, "done")]
    assert all(isinstance(j["objective"], float) and 0 < j["objective"] < 10 for j in summary["jobs"])

    # the comparison report over the variants
    drawn = []  # the figures the report draws, in order (each still drawn by compare's own function)

    def recorded(draw):
        def recording(*args, **kwargs):
            drawn.append(draw(*args, **kwargs))
            return drawn[-1]
        return recording

    for name in ("loss_figure", "bar_figure", "spikes_figure"):
        monkeypatch.setattr(compare, name, recorded(getattr(compare, name)))
    assert compare_runs.main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    result = json.loads((tmp_path / "report" / "compare.json").read_text())
    runs = {r["label"]: r for r in result["runs"]}
    assert set(runs) == {"attention=mha", "attention=gqa", "attention=kv_shift"}
    assert all(r["status"] == "done" for r in runs.values())
    # val loss from both W&B sessions of the resumed run, one point per validation
    assert all(len(r["val_loss"]["steps"]) == 2 for r in runs.values())
    assert all(r["tokens_per_sec"] > 0 for r in runs.values())
    # measured on each model's cache (fp32, 4 heads of 32): K and V per head; GQA keeps 2 KV heads
    assert {k: r["kv_cache_bytes"]["marginal"] for k, r in runs.items()} == {
        "attention=mha": 1024, "attention=gqa": 512, "attention=kv_shift": 1024}
    assert runs["attention=kv_shift"]["kv_cache_bytes"]["per_token"] > 1024  # + the previous token's K, V
    assert all(r["spikes_per_layer"]["steps"] == [0, 6, 12] for r in runs.values())
    assert all(len(r["spikes_per_layer"]["counts"][0]) == 4 for r in runs.values())  # one count per layer
    assert set(result["files"]) == {"index.html", "val_loss.png", "tokens_per_sec.png", "kv_cache_bytes.png",
                                    "spectral_spikes.png"}
    assert all((tmp_path / "report" / f).stat().st_size > 0 for f in result["files"])
    report, labels = tmp_path / "report", [r["label"] for r in result["runs"]]
    # the figures plot compare.json's numbers; each PNG is its figure (at the report's 110 dpi), a real image
    loss, throughput, kv_bytes, spikes = drawn
    lines = {line.get_label(): line.get_data() for line in loss.axes[0].get_lines()}
    assert lines.keys() == set(labels) | {f"_train {label}" for label in labels}
    for r in result["runs"]:
        assert [list(map(float, xs)) for xs in lines[r["label"]]] == [r["val_loss"]["steps"], r["val_loss"]["values"]]
        train = [list(map(float, xs)) for xs in lines[f"_train {r['label']}"]]
        assert train == [r["train_loss"]["steps"], r["train_loss"]["values"]] and len(train[0]) >= 3
        assert 0 < r["eff_rank"] <= 32 and set(r["alerts"]) == {"INFO", "WARN", "ERROR"}
    for fig, values in ((throughput, [r["tokens_per_sec"] for r in result["runs"]]),
                        (kv_bytes, [r["kv_cache_bytes"]["marginal"] for r in result["runs"]])):
        (ax,) = fig.axes
        assert [bar.get_height() for bar in ax.patches] == values
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [ax.get_title() for ax in spikes.axes] == labels
    for ax, r in zip(spikes.axes, result["runs"], strict=True):
        counts = np.array(r["spikes_per_layer"]["counts"])
        assert [line.get_label() for line in ax.get_lines()] == ["L0", "L1", "L2", "L3"]
        for layer, line in enumerate(ax.get_lines()):
            assert list(line.get_xdata()) == [0, 6, 12] and list(line.get_ydata()) == list(counts[:, layer])
    for name, fig in zip(("val_loss.png", "tokens_per_sec.png", "kv_cache_bytes.png", "spectral_spikes.png"), drawn,
                         strict=True):
        assert_png_of(report / name, fig, dpi=110)
    # index.html: a row per run with its numbers, and every figure
    page = ReportPage()
    page.feed((report / "index.html").read_text())
    assert page.title == "sweep attention_variants: 3 runs"
    assert page.rows[0][:3] == ["variant", "status", "final val/loss"]
    assert page.rows[1:] == [[r["label"], r["status"], f"{r['val_loss']['values'][-1]:.4g}",
                              f"{r['train_loss']['values'][-1]:.4g}", f"{r['eff_rank']:.4g}",
                              " / ".join(str(r["alerts"][lv]) for lv in ("INFO", "WARN", "ERROR")),
                              f"{r['tokens_per_sec']:.0f}", f"{r['kv_cache_bytes']['marginal']:.0f}",
                              f"{r['kv_cache_bytes']['per_token']:.1f}",
                              str(int(np.array(r["spikes_per_layer"]["counts"])[-1].sum())), r["dir"]]
                             for r in result["runs"]]
    assert page.images == ["val_loss.png", "tokens_per_sec.png", "kv_cache_bytes.png", "spectral_spikes.png"]


def test_failed_job_is_recorded_the_others_finish_and_rerun_retries_it(tmp_path: Path, corpus_cache: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"  # missing at first: the data=files job fails at run time only
    args = ("-m", "data=files,kjv", f"data.files=[{corpus}]", *FAST, "trainer.max_steps=2", "logger=csv",
            "experiment_name=failing", f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    sweep_dir = tmp_path / "failing"

    first = run_sweep(*args)
    assert first.returncode != 0  # Hydra's sweeper re-raises the failure once every job has run
    files_job, kjv_job = job_dir(sweep_dir, "data=files"), job_dir(sweep_dir, "data=kjv")
    failed = (files_job / "FAILED").read_text()
    assert failed.startswith("CorpusError: data.files:") and "does not exist" in failed and "Traceback" in failed
    assert not (files_job / "DONE").exists() and (kjv_job / "DONE").exists()  # the job after it still ran
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 1, "incomplete": 0}
    assert summary["jobs"][0]["status"] == "failed" and "does not exist" in summary["jobs"][0]["error"]

    shutil.copy(kjv_path(), corpus)  # fix the cause (same content: the tokenized cache is reused)
    rerun = run_sweep(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (files_job / "FAILED").exists() and (files_job / "DONE").exists()
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["counts"] == {"done": 1, "skipped": 1, "failed": 0, "incomplete": 0}
    assert [(j["dir"], j["status"], j["attempts"]) for j in summary["jobs"]] == [
        (files_job.name, "done", 2), (kjv_job.name, "skipped", 1)]


@pytest.mark.parametrize(("preset", "grid"), [
    ("attention_variants", {"attention": "mha,gqa,mla,kv_shift,mla_kv_shift"}),
    ("sizes", {"model": "tiny,small"}),
])
def test_sweep_presets_compose_as_multiruns(preset: str, grid: dict[str, str]) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"+sweep={preset}"], return_hydra_config=True)
    assert cfg.experiment_name == preset and cfg.hydra.mode == RunMode.MULTIRUN
    assert {**grid, "seed": "1337"} == dict(cfg.hydra.sweeper.params)
    assert cfg.hydra.sweep.dir == f"{cfg.paths.root}/{preset}"  # runs/<sweep name>
    assert "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys  # the preset does not name jobs


@pytest.mark.parametrize(("argv", "expected"), [
    (["train.py", "-m", "attention=mha,gqa", "seed=1"], ["train.py", "attention=gqa", "seed=1", "hydra.mode=RUN"]),
    (["x", "--multirun", "-cn", "train", "+sweep=sizes", "--config-dir=/c"],
     ["x", "-cn", "train", "--config-dir=/c", "attention=gqa", "seed=1", "hydra.mode=RUN"]),
])
def test_ddp_child_command_is_the_single_job(argv: list[str], expected: list[str]) -> None:
    assert single_run_argv(argv, ["attention=gqa", "seed=1"]) == expected


def test_summary_keeps_only_this_invocation(tmp_path: Path) -> None:
    for name, invocation, status in (("a", 1.0, "done"), ("b", 2.0, "skipped"), ("c", 2.0, "failed")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job.json").write_text(json.dumps(
            {"dir": name, "num": ord(name), "status": status, "invocation": invocation}))
    summary = summarize(tmp_path, 2.0)
    assert [j["dir"] for j in summary["jobs"]] == ["b", "c"]
    assert summary["counts"] == {"done": 0, "skipped": 1, "failed": 1, "incomplete": 0}


def test_extending_a_finished_sweep_trains_its_jobs_and_records_them_done(tmp_path: Path, corpus_cache: Path) -> None:
    args = ("-m", "attention=mha,gqa", *FAST, "trainer.max_steps=2", "logger=csv", "experiment_name=extended",
            f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    sweep_dir = tmp_path / "extended"
    assert run_sweep(*args).returncode == 0
    extended = run_sweep(*args, "extend_to=4")
    assert extended.returncode == 0, extended.stderr[-3000:]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 0, "incomplete": 0}  # trained, not skipped
    for job in (job_dir(sweep_dir, "attention=mha"), job_dir(sweep_dir, "attention=gqa")):
        assert checkpoint_step(job / "checkpoints" / "last.ckpt") == 4
        assert (job / "DONE").read_text() == "finished at step 4\n"
    again = run_sweep(*args, "extend_to=4")
    assert json.loads((sweep_dir / "sweep.json").read_text())["counts"]["skipped"] == 2 and again.returncode == 0
