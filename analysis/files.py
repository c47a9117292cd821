"""Writing a file so that a crash never leaves it half-written: the one atomic-write helper."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` stages `path`: `.NAME.<pid>.tmp` in the same directory (same filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: object) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; when the block ends without an error, rename it over
    `path` (`os.replace`, atomic on POSIX), else delete it. Readers see the old file or the new one, never a
    part; concurrent writers (other processes) each stage their own file and the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a whole text."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """`atomic_write` of `data` as indented JSON, one trailing newline."""
    return write_text(path, json.dumps(data, indent=2) + "\n")
