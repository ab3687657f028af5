"""Small file helpers shared by the caches, the evaluation and the checkpoints."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path) -> list:
    """The dict records of a JSON-lines file (none when it does not exist). A line torn by a killed
    writer is skipped with a warning instead of failing the reader."""
    path = Path(path)
    records = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: ignoring a torn line (interrupted write)", path)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records
