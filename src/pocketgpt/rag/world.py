"""The built-in example corpus: the world's encyclopedia (one article per entity, unseen ones
included), indexed once per process as passages of three whole sentences (World.passages), the
passages SFT's retrieval renderings show: a chunk cut mid-sentence reads unlike anything the model
learned from."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from ..data.tasks import default_world
from .index import Index, build_index

CHUNK, OVERLAP = 96, 8  # embedding tokens: more than a passage holds, so each passage is one chunk


@lru_cache(maxsize=1)
def world_index() -> Index:
    """Built in a temporary folder that is gone when the process ends (one per process was left in /tmp);
    the index keeps its chunks and embeddings in memory."""
    documents = {p["id"]: p["text"] for p in default_world().passages()}
    with tempfile.TemporaryDirectory(prefix="pocketgpt-world-") as folder:
        return build_index(documents, Path(folder) / "index", CHUNK, OVERLAP)[0]
