"""Synthetic minimal-pair tasks for circuit search, generated deterministically from a seed.

A minimal pair is a prefix and two continuations, one right (good) and one wrong (bad). A
model's margin on a pair is

    m = log p(good | prefix) − log p(bad | prefix)

(summed over the continuation's tokens; for one-token continuations this is the logit
difference z_good − z_bad), and a task's score is the mean margin or the accuracy P(m > 0).

Tasks shipped here:
- "agreement": subject-verb number agreement across an attractor noun, KJV-flavoured
  ("And the king that the servants saw" → " was" vs " were"), BLiMP/Linzen et al. style;
- "brackets": the next closer of a random well-nested bracket prefix ("( [ ( ) ]" → " )" vs " ]");
- "induction": random tokens whose second half repeats the first; at the repeat, the next
  token copies what followed the earlier occurrence (good) vs another token of the sequence;
- a user file (`load_pairs`): jsonl lines {"prefix", "good", "bad"}, or {"good", "bad"} full
  sentences, split at their longest common word prefix (the total log-probability difference
  of the two sentences equals the margin of that split, since the shared tokens cancel).

`task_corpus` writes training text for the agreement and bracket tasks (held-out pairs left
out), so a model trained on it with `data=files` can be searched for circuits from its checkpoint.
"""

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Encode = Callable[[str], list[int]]

NOUNS = [  # (singular, plural), words the King James text uses
    ("king", "kings"), ("servant", "servants"), ("prophet", "prophets"), ("priest", "priests"),
    ("man", "men"), ("woman", "women"), ("child", "children"), ("elder", "elders"),
    ("angel", "angels"), ("disciple", "disciples"), ("son", "sons"), ("brother", "brothers"),
]
ATTRACTORS = ["that the {a} saw", "whom the {a} loved", "of the {a}", "with the {a}", "before the {a}"]
VERBS = [("was", "were"), ("is", "are"), ("hath", "have")]  # (singular, plural)
BRACKETS = {"(": ")", "[": "]"}


@dataclass(frozen=True)
class MinimalPair:
    """A prefix and its right and wrong continuations (continuations carry their leading space)."""

    prefix: str
    good: str
    bad: str


def agreement_pairs(n: int = 200, seed: int = 0, opening: str = "And the") -> list[MinimalPair]:
    """Subject-verb agreement with an intervening noun of either number (half of them mismatched).

    "<opening> {S} {attractor clause with A} {verb}": good = the verb agreeing with S, bad = the other.
    """
    combos = [(s, a, t, v, ns, na) for s in NOUNS for a in NOUNS if a != s for t in ATTRACTORS for v in VERBS
              for ns in (0, 1) for na in (0, 1)]
    random.Random(seed).shuffle(combos)
    pairs = []
    for s, a, template, verb, ns, na in combos[:n]:
        prefix = f"{opening} {s[ns]} {template.format(a=a[na])}"
        pairs.append(MinimalPair(prefix, f" {verb[ns]}", f" {verb[1 - ns]}"))
    return pairs


def bracket_pairs(n: int = 200, seed: int = 0, max_len: int = 12) -> list[MinimalPair]:
    """Random well-nested prefixes over ( ) [ ] that end with a closer and leave an opener pending.

    good = the closer of the innermost pending opener, bad = the other closer.
    """
    rng = random.Random(seed)
    pairs: list[MinimalPair] = []
    seen: set[str] = set()
    for _ in range(1000 * n):
        if len(pairs) == n:
            break
        stack: list[str] = []
        tokens: list[str] = []
        length = rng.randint(4, max_len)
        for _ in range(length):
            if stack and (rng.random() < 0.45 or len(stack) > 3):
                tokens.append(BRACKETS[stack.pop()])
            else:
                stack.append(rng.choice(list(BRACKETS)))
                tokens.append(stack[-1])
        if not stack or tokens[-1] in BRACKETS:  # need a pending opener, and a closer last
            continue
        prefix = " ".join(tokens)
        if prefix in seen:
            continue
        seen.add(prefix)
        good = BRACKETS[stack[-1]]
        bad = next(c for c in BRACKETS.values() if c != good)
        pairs.append(MinimalPair(prefix, f" {good}", f" {bad}"))
    if len(pairs) < n:
        raise ValueError(f"only {len(pairs)} distinct bracket prefixes of length <= {max_len}; ask for fewer")
    return pairs


def bracket_sequence(rng: random.Random, max_pairs: int = 6) -> str:
    """A random complete well-nested sequence of 1..max_pairs bracket pairs over ( ) [ ], space-separated."""
    n_pairs = rng.randint(1, max_pairs)
    stack: list[str] = []
    tokens: list[str] = []
    opened = 0
    while opened < n_pairs or stack:
        if stack and (opened == n_pairs or rng.random() < 0.45 or len(stack) > 3):
            tokens.append(BRACKETS[stack.pop()])
        else:
            stack.append(rng.choice(list(BRACKETS)))
            tokens.append(stack[-1])
            opened += 1
    return " ".join(tokens)


def task_corpus(n: int = 20000, seed: int = 0, exclude: Sequence[MinimalPair] = ()) -> list[str]:
    """Training text for the agreement and bracket tasks: n lines, alternately an agreement sentence
    (a random prefix of `agreement_pairs`' form followed by its agreeing verb) and a complete
    well-nested bracket sequence (`bracket_sequence`).

    A line that starts with the prefix of an excluded pair (e.g. the evaluation pairs) is skipped,
    so a model trained on this text is scored on continuations it never saw.
    """
    rng = random.Random(seed)
    held = {p.prefix for p in exclude}
    lines: list[str] = []
    while len(lines) < n:
        if len(lines) % 2 == 0:
            s, a, template, verb = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(ATTRACTORS), rng.choice(VERBS)
            if a == s:
                continue
            ns, na = rng.randint(0, 1), rng.randint(0, 1)
            prefix = f"And the {s[ns]} {template.format(a=a[na])}"
            line, prefixes = f"{prefix} {verb[ns]}", {prefix}
        else:
            line = bracket_sequence(rng)
            tokens = line.split()
            prefixes = {" ".join(tokens[:i]) for i in range(1, len(tokens))}
        if held.isdisjoint(prefixes):
            lines.append(line)
    return lines


def load_pairs(path: str | Path) -> list[MinimalPair]:
    """Pairs from a jsonl file of {"prefix", "good", "bad"} or {"good", "bad"} objects."""
    pairs = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "good" not in row or "bad" not in row:
            raise ValueError(f"{path}:{i + 1}: a minimal pair needs 'good' and 'bad' (and optionally 'prefix')")
        if "prefix" in row:
            pairs.append(MinimalPair(row["prefix"], row["good"], row["bad"]))
        else:
            pairs.append(split_sentences(row["good"], row["bad"]))
    if not pairs:
        raise ValueError(f"{path} holds no minimal pairs")
    return pairs


def split_sentences(good: str, bad: str) -> MinimalPair:
    """Two full sentences -> prefix = their longest common run of whole words, continuations = the rest."""
    g, b = good.split(" "), bad.split(" ")
    n = 0
    while n < min(len(g), len(b)) - 1 and g[n] == b[n]:
        n += 1
    prefix = " ".join(g[:n])
    return MinimalPair(prefix, (" " if n else "") + " ".join(g[n:]), (" " if n else "") + " ".join(b[n:]))


# --------------------------------------------------------------------------- tokenized form


@dataclass
class EncodedPairs:
    """N pairs as one right-padded batch: rows 0..N-1 are prefix+good, rows N..2N-1 prefix+bad.

    idx: (2N, T) token ids; cont: (2N, T) bool, True where position t predicts a continuation
    token idx[:, t + 1]; valid: (2N, T) bool, True on real (non-pad) tokens.
    """

    name: str
    idx: torch.Tensor
    cont: torch.Tensor
    valid: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.idx.shape[0] // 2

    @classmethod
    def from_ids(
        cls, name: str, rows: Sequence[tuple[list[int], list[int], list[int]]], pad: int = 0
    ) -> "EncodedPairs":
        """Build from (prefix ids, good ids, bad ids) triples; the prefix must be non-empty."""
        seqs, conts = [], []
        for which in (1, 2):  # the good rows, then the bad rows
            for row in rows:
                prefix, continuation = row[0], row[which]
                if not prefix or not continuation:
                    raise ValueError(f"task {name}: empty prefix or continuation in a pair")
                seqs.append(prefix + continuation)
                conts.append((len(prefix), len(continuation)))
        T = max(len(s) for s in seqs)
        idx = torch.full((len(seqs), T), pad, dtype=torch.long)
        cont = torch.zeros(len(seqs), T, dtype=torch.bool)
        valid = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, (s, (p, c)) in enumerate(zip(seqs, conts, strict=True)):
            idx[i, : len(s)] = torch.tensor(s)
            cont[i, p - 1 : p - 1 + c] = True
            valid[i, : len(s)] = True
        return cls(name, idx, cont, valid)


def encode_pairs(name: str, pairs: Sequence[MinimalPair], encode: Encode, bos: str = "\n") -> EncodedPairs:
    """Tokenize prefix (after `bos`, the corpus' document separator) and continuations separately."""
    return EncodedPairs.from_ids(name, [(encode(bos + p.prefix), encode(p.good), encode(p.bad)) for p in pairs])


def induction_pairs(n: int = 200, seed: int = 0, vocab: tuple[int, int] = (0, 128), length: int = 12) -> EncodedPairs:
    """Random distinct tokens s_0..s_{L-1}, then a repeat s_0..s_{j-1} (1 <= j < L): good = s_j (the
    token that followed the earlier occurrence of s_{j-1}), bad = another s_i of the sequence."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = vocab
    if hi - lo < length + 1:
        raise ValueError(f"induction needs at least {length + 1} token ids; got the range {vocab}")
    rows = []
    for _ in range(n):
        seq = (torch.randperm(hi - lo, generator=g)[:length] + lo).tolist()
        j = int(torch.randint(1, length, (1,), generator=g))
        others = [t for i, t in enumerate(seq) if i not in (j, j - 1)]
        bad = others[int(torch.randint(len(others), (1,), generator=g))]
        rows.append((seq + seq[:j], [seq[j]], [bad]))
    return EncodedPairs.from_ids("induction", rows)


def build_task(name: str, encode: Encode, n: int = 200, seed: int = 0, bos: str = "\n",
               induction_vocab: tuple[int, int] = (0, 128)) -> EncodedPairs:
    """A named task ("agreement", "brackets", "induction") or a jsonl file path, tokenized."""
    if name == "agreement":
        return encode_pairs(name, agreement_pairs(n, seed), encode, bos)
    if name == "brackets":
        return encode_pairs(name, bracket_pairs(n, seed), encode, bos)
    if name == "induction":
        return induction_pairs(n, seed, induction_vocab)
    if Path(name).suffix == ".jsonl":
        return encode_pairs(Path(name).stem, load_pairs(name)[:n], encode, bos)
    raise ValueError(f"task {name!r} is unknown; allowed: agreement, brackets, induction, or a .jsonl file")


# ------------------------------------------------------------------------------- scoring


@torch.no_grad()
def pair_margins(model: nn.Module, data: EncodedPairs, batch_size: int = 256) -> torch.Tensor:
    """m_i = log p(good_i | prefix_i) − log p(bad_i | prefix_i), (N,).

    When every continuation is one token, good and bad rows share their inputs up to the scored
    position, so only the good rows are run and m_i = z_good − z_bad at that position.
    """
    N = data.n_pairs
    if bool((data.cont.sum(1) == 1).all()):
        pos = data.cont[:N].float().argmax(1)  # (N,) position predicting the continuation
        good, bad = data.idx[torch.arange(N), pos + 1], data.idx[torch.arange(N) + N, pos + 1]
        margins = []
        for i in range(0, N, batch_size):
            rows = torch.arange(i, min(i + batch_size, N))
            logits, _ = model(data.idx[rows])  # (b, T, V)
            z = logits[torch.arange(len(rows)), pos[rows]].float()  # (b, V)
            margins.append(z.gather(1, good[rows, None]) - z.gather(1, bad[rows, None]))
        return torch.cat(margins).squeeze(1)  # (N,)
    total = []
    for i in range(0, 2 * N, batch_size):
        idx, cont = data.idx[i : i + batch_size], data.cont[i : i + batch_size, :-1]
        logits, _ = model(idx)  # (b, T, V)
        logp = F.log_softmax(logits[:, :-1][cont].float(), dim=-1)  # (n, V): scored positions only
        tok = logp.gather(1, idx[:, 1:][cont][:, None]).squeeze(1)  # (n,)
        rows = torch.arange(idx.shape[0])[:, None].expand_as(cont)[cont]  # (n,) row of each position
        total.append(torch.zeros(idx.shape[0]).index_add_(0, rows, tok))  # (b,)
    summed = torch.cat(total)  # (2N,)
    return summed[:N] - summed[N:]


def task_score(model: nn.Module, data: EncodedPairs, metric: str = "logit_diff") -> float:
    """Mean margin ("logit_diff") or accuracy P(margin > 0) ("acc")."""
    m = pair_margins(model, data)
    if metric == "logit_diff":
        return float(m.mean())
    if metric == "acc":
        return float((m > 0).float().mean())
    raise ValueError(f"metric={metric!r} is invalid; allowed: ['logit_diff', 'acc']")


# -------------------------------------------------------------- a word tokenizer for toy models


class WordTokenizer:
    """Whitespace tokens over a fixed vocabulary ("\\n" is its own token), for models trained on these tasks."""

    def __init__(self, words: Sequence[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "\n", *words]))}

    def encode(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.replace("\n", " \n ").split()]

    def __len__(self) -> int:
        return len(self.vocab)


def task_words() -> list[str]:
    """Every word the agreement and bracket tasks use."""
    words = ["And", "the", *[w for pair in NOUNS for w in pair], *[w for pair in VERBS for w in pair]]
    words += [w for t in ATTRACTORS for w in t.split() if w != "{a}"]
    return [*dict.fromkeys(words), *BRACKETS, *BRACKETS.values()]
