"""The built-in example corpus: the world's encyclopedia (one article per entity, unseen ones
included), indexed once per process in small chunks that fit a small model's context."""

from __future__ import annotations

import tempfile
from functools import lru_cache

from ..data.tasks import default_world
from .index import Index, build_index

CHUNK, OVERLAP = 48, 8  # embedding tokens: two passages and a question fit a 256-token context


@lru_cache(maxsize=1)
def world_index() -> Index:
    documents = {a["id"]: a["text"] for a in default_world().retrieval_corpus()}
    return build_index(documents, tempfile.mkdtemp(prefix="pocketgpt-world-") + "/index", CHUNK, OVERLAP)[0]
