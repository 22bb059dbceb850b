"""Read an offline W&B run back from its own file (run-<id>.wandb) with wandb's protobuf Record
(tests/test_wandb.py, tests/test_multitask_cli.py).

The installed wandb (0.31) writes the file from its Go core and ships no Python reader, so `wandb_records` reads
the container itself: W&B's variant of LevelDB's log format (a ":W&B" header, 32 KiB blocks of checksummed chunks,
each record a serialised wandb_internal_pb2.Record); every chunk's CRC is checked, so a misread fails loudly.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER, CHUNK, BLOCK = struct.Struct("<4sHB"), struct.Struct("<IHB"), 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Every Record of a run-<id>.wandb file, in order."""
    data = path.read_bytes()
    ident, magic, _ = HEADER.unpack_from(data, 0)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    position, pending = HEADER.size, b""
    while position + CHUNK.size <= len(data):
        left = BLOCK - position % BLOCK
        checksum, length, kind = CHUNK.unpack_from(data, position)
        if left < CHUNK.size or (checksum, length, kind) == (0, 0, 0):  # the zero trailer of a block
            position += left
            continue
        payload = data[position + CHUNK.size:position + CHUNK.size + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at {position}"
        position += CHUNK.size + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


class OfflineRun:
    """The parts of one offline run a dashboard shows: run (name, group, job_type), config, history rows, summary,
    artifacts, exit code."""

    def __init__(self, run_dir: Path):
        files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, f"expected one offline W&B run in {run_dir / 'wandb'}, found {files}"
        self.folder = files[0].parent
        self.config, self.history, self.summary, self.artifacts, self.run = {}, [], {}, [], None
        self.exit_code = None  # the exit record's: 0 finished, else failed
        for record in wandb_records(files[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
            elif kind == "config":
                self.config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                self.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
            elif kind == "artifact":
                self.artifacts.append(record.artifact)
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def rows_with(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]
