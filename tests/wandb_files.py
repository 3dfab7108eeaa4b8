"""Read an offline W&B run folder the way `wandb sync` would: wandb 0.31 writes no
`files/wandb-summary.json` offline; the run's records (name, group, summary, artifacts) are in
`run-<id>.wandb`, a LevelDB-style log of protobuf records."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # b":W&B" + version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        body = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body
            pending = b""


def read_run(run_dir: Path) -> dict[str, Any]:
    """`{"name", "group", "summary", "history": {key: [values]}, "artifacts": {name: (type,
    [files])}}` of an offline run."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    out: dict[str, Any] = {
        "name": None,
        "group": None,
        "summary": {},
        "history": {},
        "artifacts": {},
    }
    for raw in _chunks(log.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"] = record.run.display_name or None
            out["group"] = record.run.run_group or None
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "history":  # one logged step; a media value comes as nested keys
            row: dict[str, Any] = {}
            for item in record.history.item:
                path = [item.key] if item.key else list(item.nested_key)
                node = row
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = json.loads(item.value_json)
            for key, value in row.items():
                out["history"].setdefault(key, []).append(value)
        elif kind == "artifact":
            files = [entry.path for entry in record.artifact.manifest.contents]
            out["artifacts"][record.artifact.name] = (record.artifact.type, files)
    return out
