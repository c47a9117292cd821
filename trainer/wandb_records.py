"""Read back what a W&B run recorded, from its `.wandb` file (works for offline runs).

The file is W&B's transaction log: a 7-byte header (b":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of records in the LevelDB log format (4-byte CRC, 2-byte length, 1-byte type:
1 full, 2 first, 3 middle, 4 last); each assembled payload is a protobuf `Record`.
"""

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb transaction log (bad header)")
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the block's tail is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def read_records(path: str | Path) -> list[Any]:
    """Every protobuf Record in a `.wandb` file, in order."""
    records = []
    for payload in _payloads(Path(path).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def history(path: str | Path) -> list[dict[str, Any]]:
    """The logged history rows as dicts of key -> decoded JSON value."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def alerts(path: str | Path) -> list[dict[str, Any]]:
    """Alerts raised with `wandb.alert` / `run.alert`: title, text, level."""
    return [
        {"title": rec.alert.title, "text": rec.alert.text, "level": rec.alert.level}
        for rec in read_records(path)
        if rec.WhichOneof("record_type") == "alert"
    ]


def metric_summaries(path: str | Path) -> dict[str, list[str]]:
    """Metric definitions (`define_metric`): name -> the summaries W&B keeps for it (min, max, last, ...)."""
    out = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "metric" and rec.metric.name:
            out[rec.metric.name] = [f.name for f, value in rec.metric.summary.ListFields() if value]
    return out


def run_config(path: str | Path) -> dict[str, Any]:
    """The run's config as W&B holds it: every config update in the file applied in order (top-level keys)."""
    config: dict[str, Any] = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def run_record(path: str | Path) -> Any:
    """The file's run record (id, name, group, tags, ...)."""
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise ValueError(f"{path} holds no run record")


def run_id(path: str | Path) -> str:
    """The run id recorded in the file."""
    return run_record(path).run_id
