"""Bad input, property-based: every bad override or data file fails before training, naming the key or
file, with a non-zero exit and no run directory left behind.

Each example runs the real entry point (`trainer.train` through runpy, as `python -m` does) in a
forked child process (tests/reliability_hooks.py: `run_forked`): the child composes the config,
validates it, prepares the corpus and exits; nothing is mocked. The default selection tries
EXAMPLES inputs plus one explicit example per category; `pytest -m slow` tries SLOW_EXAMPLES more.
One test runs a fresh `python -m trainer.train` process, the way a user does.
"""

import collections
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import CONF, run_train
from tests.reliability_hooks import run_forked

EXAMPLES, SLOW_EXAMPLES = 25, 300
# per category: inputs tried, and how many were refused before work / named the key / left nothing behind
OUTCOMES: collections.defaultdict = collections.defaultdict(collections.Counter)

# Cheap settings, in case an input were (wrongly) accepted: the run would train 1 step and the test fail.
SAFE = ("trainer=debug", "trainer.max_steps=1", "logger=csv", "spectral.mc_draws=50")


@dataclass
class BadInput:
    """One bad input: overrides, data files to write first, and the names the error message may give."""

    category: str
    overrides: list[str]
    names: list[str]  # the message must contain one of these (a key, or the file's path)
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> contents


def members(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


# Words that Hydra's grammar or OmegaConf would read as something other than a string.
RESERVED = {"true", "false", "null", "nan", "inf", "yes", "no", "on", "off", "none", "y", "n"}
words = st.from_regex(r"[a-z][a-z0-9_]{0,9}", fullmatch=True).filter(lambda w: w not in RESERVED)

INT_KEYS = ["model.n_layer", "model.d_model", "model.n_head", "model.d_ff", "data.block_size", "data.batch_size",
            "data.vocab_size", "data.val_batches", "data.num_workers", "seed", "optim.warmup_steps"]
FLOAT_KEYS = ["optim.lr", "optim.weight_decay", "optim.beta1", "optim.min_lr_ratio", "model.dropout",
              "data.val_fraction", "model.rope_base"]
BOOL_KEYS = ["model.bias", "model.tie_embeddings"]
# data.block_size and data.vocab_size are interpolated into model.*, whose check may speak first
ALIASES = {"data.block_size": ["model.block_size"], "data.vocab_size": ["model.vocab_size"]}


def named(key: str) -> list[str]:
    return [key, *ALIASES.get(key, [])]


wrong_type = st.builds(
    lambda key, word: BadInput("wrong type", [f"{key}={word}"], named(key)),
    st.sampled_from(INT_KEYS + FLOAT_KEYS + BOOL_KEYS), words,
)

POSITIVE = ["model.n_layer", "model.d_model", "model.n_head", "data.block_size", "data.batch_size",
            "data.vocab_size", "data.val_batches"]
NON_NEGATIVE = ["model.d_ff", "data.num_workers", "optim.warmup_steps"]
negative_size = st.one_of(
    st.builds(lambda key, v: BadInput("negative size", [f"{key}={v}"], named(key)),
              st.sampled_from(POSITIVE), st.integers(max_value=0)),
    st.builds(lambda key, v: BadInput("negative size", [f"{key}={v}"], named(key)),
              st.sampled_from(NON_NEGATIVE), st.integers(max_value=-1)),
)

RANGES = {  # float keys and a value outside the allowed range
    "optim.lr": st.floats(max_value=0.0),
    "optim.weight_decay": st.floats(max_value=-1e-9, allow_infinity=True),
    "optim.beta1": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9)),
    "optim.min_lr_ratio": st.one_of(st.floats(min_value=1.0 + 1e-9), st.floats(max_value=-1e-9)),
    "model.dropout": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9)),
    "data.val_fraction": st.one_of(st.floats(min_value=0.5), st.floats(max_value=0.0)),
    "model.rope_base": st.floats(max_value=0.0),
}
out_of_range = st.sampled_from(sorted(RANGES)).flatmap(
    lambda key: RANGES[key].map(lambda v: BadInput("out of range", [f"{key}={v!r}"], [key]))
)


@st.composite
def non_divisible_heads(draw: st.DrawFn) -> BadInput:
    if draw(st.booleans()):
        n_head = draw(st.integers(2, 64))
        d_model = draw(st.integers(1, 1024).filter(lambda d: d % n_head))
        return BadInput("non-divisible heads", [f"model.d_model={d_model}", f"model.n_head={n_head}"],
                        ["model.n_head"])
    n_head = draw(st.sampled_from([2, 4, 8, 16]))
    n_kv = draw(st.integers(1, 64).filter(lambda k: n_head % k))
    return BadInput("non-divisible heads", ["attention=gqa", "model.d_model=128", f"model.n_head={n_head}",
                                            f"model.attention.n_kv_head={n_kv}"], ["model.attention.n_kv_head"])


latent_too_large = st.builds(
    lambda attention, key, d_model, extra: BadInput(
        "latent > d_model", [f"attention={attention}", f"model.d_model={d_model}",
                             f"model.attention.{key}={d_model + extra}"], [f"model.attention.{key}"]),
    st.sampled_from(["mla", "mla_prerope", "mla_kv_shift"]), st.sampled_from(["kv_lora_rank", "q_lora_rank"]),
    st.sampled_from([64, 128, 256]), st.integers(1, 4096),
)

GROUPS = ["model", "attention", "data", "optim", "trainer", "callbacks", "spectral", "logger", "experiment"]
unknown_group = st.one_of(
    st.builds(lambda group, word: BadInput("unknown group", [f"{group}={word}"], [f"'{group}/{word}'"]),
              st.sampled_from(GROUPS), words).filter(lambda b: b.overrides[0].split("=")[1]
                                                     not in members(b.overrides[0].split("=")[0])),
    st.builds(lambda node, word: BadInput("unknown key", [f"{node}.{word}=1"], [f"{node}.{word}"]),
              st.sampled_from(["model", "optim", "data", "model.attention"]),
              words.filter(lambda w: w not in _known_keys())),
)


def _known_keys() -> set[str]:
    from trainer.config import TrainSchema

    keys = set(TrainSchema.__dataclass_fields__)
    for sub in ("model", "optim", "data"):
        keys |= set(getattr(TrainSchema(), sub).__dataclass_fields__)
    from models.config import AttentionConfig

    return keys | set(AttentionConfig.__dataclass_fields__)


def _files_case(kind: str, name: str, contents: bytes) -> BadInput:
    return BadInput(kind, ["data=files", f"data.files=['{{dir}}/{name}']"], ["{dir}/" + name], {name: contents})


binary = st.binary(min_size=1, max_size=4096).flatmap(
    lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\0" + b[i:]))
not_utf8 = st.binary(min_size=1, max_size=256).map(lambda b: b"text " + b + b"\xff\xfe" + b)
short_text = st.lists(words, min_size=1, max_size=60).map(lambda ws: "\n".join(ws).encode())
blank_text = st.sampled_from([b"\n", b"\n\n\n", b"   \n\t\n", b" "])
bad_files = st.one_of(
    st.sampled_from(["a.txt", "a.jsonl", "a.csv"]).map(lambda n: _files_case("empty file", n, b"")),
    st.builds(lambda n, b: _files_case("binary file", n, b), st.sampled_from(["a.txt", "a.md", "a.jsonl"]), binary),
    not_utf8.map(lambda b: _files_case("binary file", "a.txt", b)),
    short_text.map(lambda b: _files_case("corpus shorter than a block", "short.txt", b)),
    blank_text.map(lambda b: _files_case("corpus shorter than a block", "blank.txt", b)),
    st.sampled_from(["a.bin", "a.pdf", "a"]).map(lambda n: _files_case("unknown format", n, b"some text\n")),
    st.just(BadInput("missing file", ["data=files", "data.files=['{dir}/nope.txt']"], ["{dir}/nope.txt"])),
)

def _run_case(category: str, override: str, name: str) -> BadInput:
    return BadInput(category, [override], [name])


# Values the schema's types let through (trainer.*, run-level keys) and places the run writes to: each value
# Lightning, numpy or the filesystem would reject late, or that would be accepted wrongly.
RUN_LEVEL = [
    *(_run_case("trainer value", f"trainer.max_steps={v}", "trainer.max_steps") for v in (-5, "abc", -1, 0)),
    _run_case("trainer value", "trainer.precision=bogus", "trainer.precision"),
    _run_case("trainer value", "trainer.devices=0", "trainer.devices"),
    _run_case("trainer value", "trainer.accelerator=tpu", "trainer.accelerator"),
    _run_case("trainer value", "trainer.val_check_interval=0", "trainer.val_check_interval"),
    _run_case("trainer value", "trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    _run_case("trainer value", "trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    _run_case("unknown key", "+trainer.bogus=1", "trainer.bogus"),
    _run_case("unknown key", "+trainer.max_step=5", "did you mean max_steps"),
    _run_case("unknown key", "+unknown.key=1", "unknown is not a key of the training config"),
    *(_run_case("non-finite float", f"optim.{k}={v}", f"optim.{k}") for k in ("eps", "lr", "weight_decay")
      for v in ("nan", "inf")),
    *(_run_case("seed out of range", f"seed={v}", "seed") for v in (-1, 2**32)),
    _run_case("out of range", "spectral.histogram_bins=0", "spectral.histogram_bins"),
    _run_case("latent > d_model", "model.attention.v_head_dim=50000", "model.attention.v_head_dim"),
    _run_case("path outside the runs", "experiment_name=../../x", "experiment_name"),
    _run_case("unwritable path", "paths.root=/proc/qkscope-runs", "paths.root"),
    _run_case("unwritable path", "paths.root=/etc/hostname/runs", "paths.root"),
    _run_case("unwritable path", "paths.cache_dir=/proc/qkscope-cache", "paths.cache_dir"),
    BadInput("data file is not a file", ["data=files", "data.files=['{dir}']"], ["{dir} is a directory"]),
    BadInput("data file is not a file", ["data=files", "data.files=['/dev/zero']"],
             ["/dev/zero is not a regular file"]),
    _files_case("unparseable file", "a.jsonl", b"not json\n{broken\n"),
]
MLA_KEYS = {"model.attention.v_head_dim"}  # MLA-only keys: their cases run with attention=mla
for case in RUN_LEVEL:
    if any(o.split("=")[0] in MLA_KEYS for o in case.overrides):
        case.overrides.insert(0, "attention=mla")

bad_inputs = st.one_of(wrong_type, negative_size, out_of_range, non_divisible_heads(), latent_too_large,
                       unknown_group, bad_files, st.sampled_from(RUN_LEVEL))


def _scratch_files(cache: Path) -> set[Path]:
    """What `datasets` writes while reading (Arrow and lock files): nothing may stay once a run is refused."""
    return {p for p in (cache / "hf").rglob("*") if p.is_file()} if (cache / "hf").is_dir() else set()


def check(bad: BadInput, cache: Path) -> None:
    """Run the entry point on `bad`; assert it failed before training, naming the key or file, leaving nothing."""
    outcome = OUTCOMES[bad.category]
    outcome["tried"] += 1
    scratch = _scratch_files(cache)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, contents in bad.files.items():
            (d / name).write_bytes(contents)
        root = d / "runs"
        args = [*SAFE, f"paths.root={root}", f"paths.cache_dir={cache}",
                *(o.replace("{dir}", str(d)) for o in bad.overrides)]
        proc = run_forked(args, timeout=120)
        names = [n.replace("{dir}", str(d)) for n in bad.names]
        refused = proc.returncode != 0 and "Restoring states" not in proc.output and "Trainer.fit" not in proc.output
        named = any(n in proc.output for n in names)
        clean = (not root.exists() or not any(root.iterdir())) and _scratch_files(cache) == scratch
        for key, ok in (("refused before work", refused), ("named the key", named), ("left nothing", clean)):
            outcome[key] += ok
        assert refused, (bad, proc.output[-2000:])
        assert named, (bad, proc.output[-2000:])
        assert clean, (bad, sorted(root.rglob("*")), _scratch_files(cache) - scratch)


@pytest.mark.parametrize("bad", RUN_LEVEL, ids=lambda b: " ".join(b.overrides))
def test_bad_run_level_value_fails_before_training(bad: BadInput, corpus_cache: Path) -> None:
    check(bad, corpus_cache)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(bad=BadInput("wrong type", ["model.n_layer=four"], ["model.n_layer"]))
@example(bad=BadInput("negative size", ["data.block_size=-8"], ["data.block_size", "model.block_size"]))
@example(bad=BadInput("non-divisible heads", ["model.n_head=5"], ["model.n_head"]))
@example(bad=BadInput("latent > d_model", ["attention=mla", "model.attention.kv_lora_rank=129"],
                  ["model.attention.kv_lora_rank"]))
@example(bad=BadInput("unknown group", ["attention=flash"], ["'attention/flash'"]))
@example(bad=_files_case("empty file", "a.txt", b""))
@example(bad=_files_case("binary file", "a.txt", bytes(range(256))))
@example(bad=_files_case("corpus shorter than a block", "short.txt", b"In the beginning\n" * 30))
@given(bad=bad_inputs)
def test_bad_input_fails_before_training(bad: BadInput, corpus_cache: Path) -> None:
    check(bad, corpus_cache)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bad=bad_inputs)
def test_many_bad_inputs_fail_before_training(bad: BadInput, corpus_cache: Path) -> None:
    check(bad, corpus_cache)


def test_short_corpus_exits_through_a_fresh_process(tmp_path: Path, corpus_cache: Path) -> None:
    """`python -m trainer.train` itself: exit code 2, the file named, no run directory."""
    short = tmp_path / "short.txt"
    short.write_text("And God said, Let there be light: and there was light.\n" * 25)
    root = tmp_path / "runs"
    proc = run_train(*SAFE, "data=files", f"data.files=['{short}']", f"paths.root={root}",
                     f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: data: the " in proc.stderr and f"split of ['{short}'] has" in proc.stderr
    assert not root.exists() or not any(root.iterdir())


def teardown_module() -> None:
    """Print the campaign's summary; with QKSCOPE_FUZZ_REPORT=<file>, also write it there as JSON."""
    total = collections.Counter()
    for counts in OUTCOMES.values():
        total.update(counts)
    print(f"\nbad inputs: {dict(total)}")
    if os.environ.get("QKSCOPE_FUZZ_REPORT"):
        report = {"total": dict(total), "categories": {c: dict(n) for c, n in sorted(OUTCOMES.items())}}
        Path(os.environ["QKSCOPE_FUZZ_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
