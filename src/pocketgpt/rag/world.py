"""The built-in example corpus: the world's encyclopedia (one article per entity, unseen ones
included), indexed once per process as passages of three whole sentences (World.passages), the
passages SFT's retrieval renderings show: a chunk cut mid-sentence reads unlike anything the model
learned from."""

from __future__ import annotations

import tempfile
from functools import lru_cache

from ..data.tasks import default_world
from .index import Index, build_index

CHUNK, OVERLAP = 96, 8  # embedding tokens: more than a passage holds, so each passage is one chunk


@lru_cache(maxsize=1)
def world_index() -> Index:
    documents = {p["id"]: p["text"] for p in default_world().passages()}
    return build_index(documents, tempfile.mkdtemp(prefix="pocketgpt-world-") + "/index", CHUNK, OVERLAP)[0]
