"""Head gates, minimal-pair tasks, Search-K-MSHC, and the circuits entry point."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.surgery.circuits import CircuitConfig, SetScorer, overlap, plot_circuits, search, search_circuit
from analysis.surgery.tasks import (
    BRACKETS,
    NOUNS,
    EncodedPairs,
    MinimalPair,
    WordTokenizer,
    agreement_pairs,
    bracket_pairs,
    build_task,
    induction_pairs,
    load_pairs,
    task_corpus,
    task_score,
    task_words,
)
from models import GPT, GPTConfig
from models.head_gate import head_gates, head_output_means, head_shape
from tests.png_checks import assert_png_of
from tests.surgery_helpers import run_tool

ALL_VARIANTS = [
    {"name": "mha"}, {"name": "gqa", "n_kv_head": 2}, {"name": "kv_shift"},
    {"name": "mla", "kv_lora_rank": 16, "v_head_dim": 6}, {"name": "mla_prerope", "kv_lora_rank": 16, "v_head_dim": 6},
    {"name": "mla_kv_shift", "kv_lora_rank": 16, "q_lora_rank": 16, "v_head_dim": 6},
]


def tiny(attention: dict, vocab: int = 41, n_layer: int = 2, d_model: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=24, n_layer=n_layer, d_model=d_model, n_head=4,
                         attention=attention)).eval()


# ------------------------------------------------------------------------------ head gates


@pytest.mark.parametrize("attention", ALL_VARIANTS, ids=lambda a: a["name"])
def test_head_gates_are_exact_when_all_ones_and_after_exit(attention: dict) -> None:
    m = tiny(attention)
    L, H, dv = head_shape(m)
    assert (L, H) == (2, 4) and dv == (6 if "v_head_dim" in attention else 8)
    idx = torch.randint(0, 41, (2, 10))
    plain = m(idx)[0]
    means = head_output_means(m, idx)
    for mode in ("zero", "mean"):
        with head_gates(m, torch.ones(L, H), mode, means):
            assert torch.equal(m(idx)[0], plain)
        partial = torch.ones(L, H)
        partial[1, 2] = 0.0
        with head_gates(m, partial, mode, means):
            assert not torch.allclose(m(idx)[0], plain)
        assert torch.equal(m(idx)[0], plain)  # hooks removed


@pytest.mark.parametrize("attention", ALL_VARIANTS[:4], ids=lambda a: a["name"])
def test_zero_and_mean_ablation_replace_the_heads_output(attention: dict) -> None:
    m = tiny(attention)
    L, H, dv = head_shape(m)
    idx = torch.randint(0, 41, (2, 10))
    means = head_output_means(m, idx)
    seen = []
    hook = m.blocks[0].attn.o_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    mask = torch.ones(L, H)
    mask[0, 1] = 0.0
    with head_gates(m, mask, "mean", means):
        m(idx)
    with head_gates(m, torch.zeros(L, H), "zero"):
        m(idx)
    hook.remove()
    mean_gated = seen[0].view(2, 10, H, dv)  # o_proj's input as the gate pre-hook left it
    assert torch.equal(mean_gated[:, :, 1], means[0, 1].expand(2, 10, dv))
    assert torch.equal(seen[1], torch.zeros_like(seen[1]))


# ---------------------------------------------------------------------------------- tasks


def test_tasks_are_deterministic_and_correct() -> None:
    assert agreement_pairs(50, seed=3) == agreement_pairs(50, seed=3) != agreement_pairs(50, seed=4)
    for p in agreement_pairs(100):
        subject = p.prefix.split()[2]
        singular = any(subject == s for s, _ in NOUNS)
        assert (p.good.strip() in ("was", "is", "hath")) == singular and p.good != p.bad
    for p in bracket_pairs(100, seed=1):
        stack = []
        for t in p.prefix.split():
            if t in BRACKETS:
                stack.append(t)
            else:
                assert BRACKETS[stack.pop()] == t
        assert p.good.strip() == BRACKETS[stack[-1]] and p.prefix.split()[-1] in BRACKETS.values()
    data = induction_pairs(20, seed=0, vocab=(5, 60), length=10)
    for row in range(20):
        seq = data.idx[row][data.valid[row]].tolist()
        first, repeat = seq[:10], seq[10:-1]
        assert repeat == first[: len(repeat)] and seq[-1] == first[len(repeat)]
        bad_row = data.idx[20 + row][data.valid[20 + row]].tolist()
        assert bad_row[:-1] == seq[:-1] and bad_row[-1] != seq[-1]


def test_task_corpus_leaves_the_evaluation_pairs_out() -> None:
    held = agreement_pairs(100, seed=0) + bracket_pairs(100, seed=0)
    prefixes = {p.prefix for p in held}
    lines = task_corpus(4000, seed=1, exclude=held)
    assert len(lines) == 4000 and lines == task_corpus(4000, seed=1, exclude=held)
    for line in lines[0::2]:  # agreement sentences: the verb agrees with the subject
        words = line.split()
        assert " ".join(words[:-1]) not in prefixes
        assert (words[-1] in ("was", "is", "hath")) == any(words[2] == s for s, _ in NOUNS)
    for line in lines[1::2]:  # complete, well-nested bracket sequences
        tokens, stack = line.split(), []
        for t in tokens:
            if t in BRACKETS:
                stack.append(t)
            else:
                assert BRACKETS[stack.pop()] == t
        assert not stack and all(" ".join(tokens[:i]) not in prefixes for i in range(1, len(tokens)))
    free = task_corpus(4000, seed=1)  # without the exclusion, held-out prefixes do occur
    assert any(" ".join(line.split()[:-1]) in prefixes for line in free[0::2])


def test_user_minimal_pairs_from_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prefix": "the men", "good": " were", "bad": " was"}\n'
                 '{"good": "the king was wise", "bad": "the king were wise"}\n')
    pairs = load_pairs(f)
    assert pairs == [MinimalPair("the men", " were", " was"), MinimalPair("the king", " was wise", " were wise")]
    tok = WordTokenizer(["the", "men", "king", "was", "were", "wise"])
    data = build_task(str(f), tok.encode)
    assert data.name == "pairs" and data.n_pairs == 2


def test_margin_is_the_logit_difference_for_one_token_continuations() -> None:
    m = tiny({"name": "mha"})
    data = EncodedPairs.from_ids("t", [([1, 2, 3], [4], [5]), ([6, 7], [8], [9])])
    with torch.no_grad():
        logits = m(torch.tensor([[1, 2, 3]]))[0][0, -1]
    expected = float(logits[4] - logits[5])
    score = task_score(m, EncodedPairs.from_ids("t", [([1, 2, 3], [4], [5])]))
    assert abs(score - expected) < 1e-5
    assert 0.0 <= task_score(m, data, "acc") <= 1.0


# -------------------------------------------------------------------------------- search


def planted(L: int = 3, H: int = 4) -> SetScorer:
    """S(X) = 1 if X holds (1, 2) and one of the redundant pair (0, 1), (0, 3); else a small leak."""
    def score(active: frozenset) -> float:
        core = (1, 2) in active
        backup = bool({(0, 1), (0, 3)} & active)
        return float(core and backup) + 0.01 * len(active)

    return SetScorer(L, H, score)


def test_search_finds_the_planted_minimal_circuit() -> None:
    cfg = CircuitConfig(eps=0.8, window=1, percentile=50)
    c = search(planted(), "planted", cfg)
    assert (1, 2) in c.heads and len(c.heads) == 2 and len({(0, 1), (0, 3)} & set(c.heads)) == 1
    assert c.certified_minimal and c.score_circuit >= c.threshold
    assert c.removal_drop > 0.9 and c.recovered >= 0.8
    assert c.candidate_layers == [0, 1] and not c.phase1_fallback
    assert c.strong == [(1, 2)]  # alone indispensable; the backup heads are weak (redundant)
    other = search(planted(), "again", CircuitConfig(seed=1))
    o = overlap(c, other)
    assert 1 / 3 <= o["jaccard"] <= 1 and o["weighted_jaccard"] == 1.0


def fit_on_text(model: GPT, tok: WordTokenizer, lines: list[str], steps: int, lr: float = 3e-3) -> GPT:
    """Next-token training on every token of "\\n" + line (padding ignored), batches of 64 lines."""
    rows = [tok.encode("\n" + line) for line in lines]
    T = max(map(len, rows))
    x = torch.zeros(len(rows), T - 1, dtype=torch.long)
    y = torch.full((len(rows), T - 1), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1], y[i, : len(r) - 1] = torch.tensor(r[:-1]), torch.tensor(r[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        i = torch.randint(len(x), (64,), generator=g)
        _, loss = model(x[i], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_kmshc_on_a_model_trained_on_agreement_and_brackets() -> None:
    """A model trained on agreement + bracket text that never shows the evaluation prefixes solves
    both tasks; each task's circuit alone restores >= eps of the score and removing it costs most of it."""
    torch.set_num_threads(1)
    tok = WordTokenizer(task_words())
    tasks = {name: build_task(name, tok.encode, n=200, seed=0) for name in ("agreement", "brackets")}
    held = agreement_pairs(200, seed=0) + bracket_pairs(200, seed=0)
    lines = task_corpus(20000, seed=1, exclude=held)
    model = fit_on_text(tiny({"name": "mha"}, vocab=len(tok), n_layer=4, d_model=64), tok, lines, steps=1500)
    cfg = CircuitConfig(eps=0.8)
    circuits = []
    for name, data in tasks.items():
        acc = task_score(model, data, "acc")
        c = search_circuit(model, data, cfg)
        print(f"{name}: acc {acc:.3f}, circuit {c.heads}, restored {c.recovered:.2f}, dropped {c.removal_drop:.2f}")
        assert acc > 0.9
        assert c.score_circuit >= c.threshold and c.recovered >= cfg.eps  # sufficient alone
        assert c.removal_drop > 0.5  # and removing it costs most of the score
        assert 0 < len(c.heads) < 8
        circuits.append(c)
    o = overlap(*circuits)
    print(f"overlap: jaccard {o['jaccard']:.3f}, weighted {o['weighted_jaccard']:.3f}")
    assert 0.0 <= o["jaccard"] <= 1.0 and np.isfinite(o["weighted_jaccard"])


# --------------------------------------------------------------------------- entry point


def test_entry_point_writes_circuits_overlap_and_heatmap(surgery_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "circuits"
    proc = run_tool("trainer.circuits", f"ckpt='{surgery_checkpoint}'", f"out={out}", "tasks=[agreement,brackets]",
                    "data.n_pairs=16", "search.n_samples=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "circuits.json").read_text())
    assert [c["task"] for c in result["circuits"]] == ["agreement", "brackets"]
    for c in result["circuits"]:
        assert np.array(c["impact"]).shape == (4, 4) and {"score_full", "score_circuit", "heads"} <= set(c)
    assert result["overlap"][0]["tasks"] == ["agreement", "brackets"]
    assert len((out / "circuits.csv").read_text().splitlines()) == 1 + 2 * 16
    assert (out / "circuits.png").stat().st_size > 0
    # the plot: per task a (layer x head) heatmap of the removal impact, the circuit's heads outlined in red
    circuits = [SimpleNamespace(task=c["task"], impact=c["impact"], heads=[tuple(h) for h in c["heads"]],
                                recovered=c["recovered"]) for c in result["circuits"]]
    fig = plot_circuits(circuits)
    maps = [ax for ax in fig.axes if ax.images and ax.get_title()]  # (the others are the colour bars)
    assert len(maps) == 2 and len(fig.axes) == 4
    for ax, c in zip(maps, circuits, strict=True):
        np.testing.assert_array_equal(ax.images[0].get_array(), np.array(c.impact))
        assert ax.get_title().startswith(f"{c.task}: |H|={len(c.heads)}, recovered ")
        boxes = [p.get_xy() for p in ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
        assert sorted(boxes) == sorted((head - 0.5, layer - 0.5) for layer, head in c.heads)
    assert_png_of(out / "circuits.png", fig, dpi=120)  # the file is this figure
