"""The weights shipped inside the package: their folder and manifest (read without torch)."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["WEIGHTS_DIR", "shipped_manifest", "shipped_sampling"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_manifest(folder=None) -> dict:
    """The manifest of the shipped weights in ``folder`` (default :data:`WEIGHTS_DIR`; {} when none
    are shipped)."""
    p = Path(folder if folder is not None else WEIGHTS_DIR) / "manifest.json"
    if not p.exists():
        return {}
    return json.loads(p.read_text())


def shipped_sampling(folder=None) -> dict:
    """Sampling defaults of the shipped default checkpoint, from its manifest ({} when none)."""
    manifest = shipped_manifest(folder)
    entry = manifest.get("files", {}).get(manifest.get("default", ""), {})
    return dict(entry.get("sampling") or {})
