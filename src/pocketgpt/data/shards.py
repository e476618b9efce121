"""Token shards: a source tokenized once into fixed-size files on disk, read back through np.memmap.

A source's documents are streamed (never the whole source in memory), encoded in batches by a pool of
worker processes, and appended in their order to shards of at most `shard_tokens` tokens, each
holding whole documents (a document longer than a shard gets one of its own):

    NAME/shard_00000.bin        the tokens, uint16 when the vocabulary fits, else uint32
    NAME/shard_00000.docs.npy   a row per document: [tokens, UTF-8 bytes]
    NAME/source.json            what the shards were made from, and when complete, what they hold

A shard is written under a temporary name and renamed when it is complete, its document table first:
after a kill, the finished shards are kept and the half-written one is discarded, and preparing
again skips the documents the finished shards hold. Where shards end depends only on the documents,
so the files are the same whatever the number of workers. `source.json` records a hash of the source
(its settings and its files' sizes and times), the tokenizer's fingerprint, the dtype and the shard
size: when any of them changes, the source is tokenized again from scratch.

A `TokenStream` reads the shards as one long array whose documents come in any order (the
mixture's shuffled train or validation split), reading only what a slice asks for.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np

from ..chat import ChatTemplate
from ..common import PocketError, atomic_write_bytes, atomic_write_json, console, human
from .sources import SourceSpec, document_text, iter_documents, source_hash

FORMAT = 1
SOURCE_MANIFEST = "source.json"
DEFAULT_SHARD_TOKENS = 16 * 2**20
# A unit of work for one worker: large enough that sending it costs little next to encoding it.
BATCH_DOCS, BATCH_CHARS = 512, 4_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.bin"


def docs_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.docs.npy"


def source_identity(spec: SourceSpec, chat: ChatTemplate, shard_tokens: int) -> dict:
    """What a source's shards are made from: it changes exactly when the shards would."""
    return {"format": FORMAT, "source_hash": source_hash(spec), "tokenizer": chat.tokenizer.fingerprint(),
            "chat_template": chat.spec(), "dtype": token_dtype(chat.tokenizer.vocab_size).name,
            "shard_tokens": shard_tokens}


# ----------------------------------------------------------------------------- encoding


def encode_documents(chat: ChatTemplate, docs: list, threads: int = 1) -> list[list[int]]:
    """Each text as a whole document (ours: <|bos|> + tokens); a conversation rendered by the chat template."""
    encoded = iter(chat.documents([d for d in docs if isinstance(d, str)], threads=threads))
    return [next(encoded) if isinstance(d, str) else chat.render(d)[0] for d in docs]


def encode_batch(chat: ChatTemplate, docs: list, dtype: np.dtype, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> their tokens end to end, and a row per document: [tokens, UTF-8 bytes]."""
    encoded = encode_documents(chat, docs, threads)
    sizes = np.array([[len(ids), len(document_text(d).encode("utf-8"))] for ids, d in zip(encoded, docs)],
                     dtype=np.int64).reshape(-1, 2)
    tokens = np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=int(sizes[:, 0].sum()))
    return tokens, sizes


_worker: dict = {}  # what each pool process encodes with, set once by _start_worker


def _start_worker(chat: ChatTemplate, dtype: np.dtype) -> None:
    _worker.update(chat=chat, dtype=dtype)


def _encode_in_worker(docs: list) -> tuple[np.ndarray, np.ndarray]:
    return encode_batch(_worker["chat"], docs, _worker["dtype"])


def document_batches(docs: Iterable) -> Iterator[list]:
    """Consecutive runs of documents, cut by count and by characters (not by the number of workers)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(document_text(doc))
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encoded_batches(chat: ChatTemplate, batches: Iterable[list], dtype: np.dtype,
                    workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode batches in order, on `workers` processes. At most two batches per worker are in flight
    (Pool.imap would read the whole source ahead into its queue)."""
    if workers <= 1:
        for batch in batches:
            yield encode_batch(chat, batch, dtype, threads=1)
        return
    with multiprocessing.get_context().Pool(workers, _start_worker, (chat, dtype)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends encoded documents to shard files of at most `shard_tokens` tokens, whole documents each.

    The open shard grows in a temporary file; it is renamed into place once full (or at the end), after
    its document table, so a shard file that exists is complete."""

    def __init__(self, directory: Path, first_index: int, shard_tokens: int, dtype: np.dtype):
        self.directory, self.index = directory, first_index
        self.shard_tokens, self.dtype = shard_tokens, dtype
        self.file, self.count, self.sizes = None, 0, []

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Documents as encode_batch returns them: split into runs that fit the open shard."""
        offsets = np.concatenate([[0], np.cumsum(sizes[:, 0])])
        i = 0
        while i < len(sizes):
            # the first document j that does not fit in the room left after documents i..j-1
            j = int(np.searchsorted(offsets, offsets[i] + self.shard_tokens - self.count, side="right")) - 1
            if j <= i:
                if self.count:  # the next document does not fit: this shard is full
                    self._finish()
                    continue
                j = i + 1  # a document longer than a shard makes a shard of its own
            self._append(tokens[offsets[i]:offsets[j]], sizes[i:j])
            i = j

    def _append(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        if self.file is None:
            self.file = open(self._temp_path(), "wb")
        self.file.write(tokens.tobytes())
        self.sizes.append(sizes)
        self.count += len(tokens)

    def _temp_path(self) -> Path:
        path = shard_path(self.directory, self.index)
        return path.with_name(f".{path.name}.tmp")

    def _finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        table = io.BytesIO()
        np.save(table, np.concatenate(self.sizes))
        atomic_write_bytes(docs_path(self.directory, self.index), table.getvalue())
        os.replace(self._temp_path(), shard_path(self.directory, self.index))
        self.index += 1
        self.file, self.count, self.sizes = None, 0, []

    def close(self) -> None:
        if self.count:
            self._finish()

    def discard(self) -> None:
        """Drop the half-written shard (what a kill would leave behind, and a restart deletes)."""
        if self.file is not None:
            self.file.close()
            self._temp_path().unlink(missing_ok=True)


def finished_shards(directory: Path, dtype: np.dtype) -> list[np.ndarray]:
    """The document tables of the complete shards 0, 1, ... in order. Temporary files (a shard being
    written when the process died) and shards after the first gap or damaged one are deleted."""
    for temp in directory.glob(".shard_*.tmp"):
        temp.unlink()
    tables, index = [], 0
    while shard_path(directory, index).exists() and docs_path(directory, index).exists():
        sizes = np.load(docs_path(directory, index))
        if shard_path(directory, index).stat().st_size != int(sizes[:, 0].sum()) * dtype.itemsize:
            break
        tables.append(sizes)
        index += 1
    for stale in sorted(directory.glob("shard_*")):
        if int(stale.name[6:11]) >= index:
            stale.unlink()
    return tables


def read_manifest(path: Path) -> dict:
    """A JSON manifest, or {} where there is none or it cannot be read (a damaged one is rebuilt, not trusted)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def shard_damage(directory: Path, manifest: dict) -> str | None:
    """What is wrong with a complete source's shards on disk, or None: every shard its manifest lists must be
    there at the size its tokens take, with its table of documents (a file cut short read past its end)."""
    itemsize = np.dtype(manifest.get("dtype", "uint16")).itemsize
    for shard in manifest.get("shards", []):
        path = directory / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
            return f"{path} is missing or not {shard['tokens']:,} tokens long"
        if not path.with_name(path.name.replace(".bin", ".docs.npy")).is_file():
            return f"the table of documents of {path} is missing"
    return None


def tokenize_source(spec: SourceSpec, chat: ChatTemplate, directory: str | Path,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1) -> dict:
    """Shard one source into `directory` (or carry on where a killed run stopped); its manifest.
    Nothing is done when the directory already holds the shards of this source and tokenizer."""
    if shard_tokens < 1:
        raise PocketError(f"shard_tokens must be at least 1, got {shard_tokens}")
    directory = Path(directory)
    identity = source_identity(spec, chat, shard_tokens)
    manifest_path = directory / SOURCE_MANIFEST
    manifest = read_manifest(manifest_path)
    same_source = {k: manifest.get(k) for k in identity} == identity
    if same_source and manifest.get("complete"):
        damage = shard_damage(directory, manifest)
        if damage is None:
            return manifest
        console.print(f"[yellow]tokenizing {spec.name} again: {damage}[/]")
        same_source = False
    if not same_source and directory.exists():  # another source or tokenizer: nothing here can be reused
        for old in directory.iterdir():
            old.unlink()
    dtype = token_dtype(chat.tokenizer.vocab_size)
    manifest = {"source": spec.name, "kind": spec.kind, **identity, "complete": False}
    atomic_write_json(manifest_path, manifest)

    tables = finished_shards(directory, dtype)
    done = sum(len(t) for t in tables)
    writer = ShardWriter(directory, len(tables), shard_tokens, dtype)
    t0, tokens_written = time.time(), 0
    with console.status(f"tokenizing {spec.name}") as status:
        try:
            batches = document_batches(islice(iter_documents(spec), done, None))
            for tokens, sizes in encoded_batches(chat, batches, dtype, workers):
                writer.add(tokens, sizes)
                tokens_written += len(tokens)
                status.update(f"tokenizing {spec.name}: {human(tokens_written)} tokens, "
                              f"{human(tokens_written / max(time.time() - t0, 1e-9))} tokens/s")
            writer.close()
        except BaseException:
            writer.discard()
            raise
    tables = finished_shards(directory, dtype)
    sizes = np.concatenate(tables)
    manifest.update(complete=True, documents=len(sizes), tokens=int(sizes[:, 0].sum()),
                    bytes=int(sizes[:, 1].sum()), resumed_after_documents=done,
                    shards=[{"file": shard_path(directory, i).name, "documents": len(t), "tokens": int(t[:, 0].sum())}
                            for i, t in enumerate(tables)])
    atomic_write_json(manifest_path, manifest)
    resumed = f" (resumed after {done:,} documents)" if done else ""
    console.print(f"tokenized {spec.name}: {manifest['documents']:,} documents, {human(manifest['tokens'])} tokens "
                  f"in {len(tables)} shard(s), {human(tokens_written / max(time.time() - t0, 1e-9))} tokens/s{resumed}")
    return manifest


def document_sizes(directory: str | Path) -> np.ndarray:
    """[tokens, bytes] of every document of a sharded source, in the source's order."""
    directory = Path(directory)
    shards = read_source_manifest(directory)["shards"]
    return np.concatenate([np.load(docs_path(directory, i)) for i in range(len(shards))])


def read_source_manifest(directory: Path) -> dict:
    manifest = read_manifest(directory / SOURCE_MANIFEST)
    if not manifest.get("complete"):
        raise PocketError(f"{directory} holds no complete shards: prepared data is incomplete, "
                          f"run the stage again (or delete {directory.parent}) to redo it")
    return manifest


# ----------------------------------------------------------------------------- reading


class TokenStream:
    """One split of a sharded source as a single token array: `pieces` (2, n) gives, for each piece of
    a document in the split's order, where it starts in the source's tokens (row 0) and where it ends in
    this stream (row 1). Slicing reads just those tokens from the memory-mapped shards."""

    def __init__(self, shards: list[np.ndarray], pieces: np.ndarray):
        self.shards = shards
        self.shard_starts = np.cumsum([0] + [len(s) for s in shards])
        self.starts, self.ends = pieces[0], pieces[1]
        self.dtype = shards[0].dtype

    @classmethod
    def open(cls, directory: str | Path, split: str) -> TokenStream:
        directory = Path(directory)
        manifest = read_source_manifest(directory)
        shards = [np.memmap(directory / s["file"], dtype=manifest["dtype"], mode="r") for s in manifest["shards"]]
        pieces_path = directory / f"{split}.npy"
        if not pieces_path.exists():
            raise PocketError(f"{pieces_path} is missing: prepared data is incomplete, run the stage again")
        return cls(shards, np.load(pieces_path, mmap_mode="r"))

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenStream is read by contiguous slices")
        start, stop, _ = key.indices(len(self))
        parts = []
        piece = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begins = int(self.ends[piece - 1]) if piece else 0
            source_pos = int(self.starts[piece]) + start - begins
            take = min(stop, int(self.ends[piece])) - start
            shard = int(np.searchsorted(self.shard_starts, source_pos, side="right")) - 1
            local = source_pos - int(self.shard_starts[shard])  # a piece never spans two shards
            parts.append(self.shards[shard][local:local + take])
            start += take
            piece += 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)
