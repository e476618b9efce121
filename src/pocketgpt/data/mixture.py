"""The pretraining mixture: tokenize each source once, then draw B x (T+1) rows from them by weight.

Preparation shards every source on disk (data/shards.py: streamed, encoded in parallel, resumable)
and splits it into train and validation: its documents in a seeded shuffled order, each preceded by
<|bos|>, the last `val_fraction` of them held out (a source of a single document holds out the tail
of its tokens). A split is a list of pieces of the shards, read as one stream (a `TokenStream`), so
no corpus is ever loaded into memory. Rows are contiguous windows of a stream, so a row may span
documents, separated by <|bos|> as in GPT pretraining.

Which source feeds which row of global step s is a pure function of (seed, s); each source keeps a
cursor that moves through its stream and wraps around (one more epoch). The loader's whole state is
therefore {step, cursors, epochs}: saved with a checkpoint, it resumes the exact same batches. Under
torchrun every process computes the same global assignment, moves every cursor, and takes its own
slice of rows: the state is the global position, the same in every process and for any number of
processes, so a run started with N processes resumes with M (B x M rows per step from then on).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..chat import ChatTemplate
from ..common import PocketError, atomic_write_bytes, atomic_write_json
from .shards import (
    DEFAULT_SHARD_TOKENS,
    SOURCE_MANIFEST,
    TokenStream,
    document_sizes,
    read_manifest,
    shard_damage,
    source_identity,
    token_dtype,
    tokenize_source,
)
from .sources import SourceSpec

MANIFEST = "mixture.json"
FORMAT = 2  # 1: each split of a source in one NAME.{train,val}.bin file, read whole


def prepare_mixture(specs: list[SourceSpec], chat: ChatTemplate, out_dir: str | Path, val_fraction: float = 0.02,
                    seed: int = 0, workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Shard every source into out_dir/NAME/ and write its train and validation splits; sources whose
    shards are already there are reused, and nothing at all is done if the mixture is unchanged."""
    out_dir = Path(out_dir)
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PocketError(f"the data mixture names a source more than once: {', '.join(twice)}")
    identities = {s.name: source_identity(s, chat, shard_tokens) for s in specs}
    weights = {s.name: s.weight for s in specs}
    blob = json.dumps([FORMAT, identities, weights, val_fraction, seed], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    manifest_path = out_dir / MANIFEST
    manifest = read_manifest(manifest_path)
    if manifest.get("key") == key and intact(out_dir, specs):
        return manifest
    for unsharded in out_dir.glob("*.bin"):  # what format 1 wrote: superseded by the shards
        unsharded.unlink()
    manifest = {"format": FORMAT, "key": key, "dtype": token_dtype(chat.tokenizer.vocab_size).name,
                "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "sources": {}}
    for spec in specs:
        source = tokenize_source(spec, chat, out_dir / spec.name, shard_tokens, workers)
        splits = split_documents(document_sizes(out_dir / spec.name)[:, 0], val_fraction, f"{seed}:{spec.name}")
        for split, pieces in splits.items():
            table = io.BytesIO()
            np.save(table, pieces)
            atomic_write_bytes(out_dir / spec.name / f"{split}.npy", table.getvalue())
        manifest["sources"][spec.name] = {
            "weight": spec.weight, "kind": spec.kind, "documents": source["documents"], "bytes": source["bytes"],
            "train_tokens": int(splits["train"][1, -1]), "val_tokens": int(splits["val"][1, -1]),
            "shards": len(source["shards"]), "source_hash": source["source_hash"]}
    atomic_write_json(manifest_path, manifest)
    return manifest


def intact(out_dir: Path, specs: list[SourceSpec]) -> bool:
    """Whether every source's shards and split tables are whole (a damaged one is prepared again)."""
    for spec in specs:
        directory = out_dir / spec.name
        manifest = read_manifest(directory / SOURCE_MANIFEST)
        if not manifest.get("complete") or shard_damage(directory, manifest) is not None:
            return False
        for split in ("train", "val"):
            try:
                np.load(directory / f"{split}.npy", allow_pickle=False)
            except (OSError, ValueError):
                return False
    return True


def split_documents(lengths: np.ndarray, val_fraction: float, seed: str) -> dict[str, np.ndarray]:
    """Train and validation pieces of a source whose documents have `lengths` tokens, as TokenStream
    reads them: row 0 where a piece starts in the source, row 1 where it ends in the split's stream.

    The documents are shuffled as `random.Random(seed).shuffle` shuffles a list of them (the order the
    in-memory mixture used, so a seed gives the batches it gave), and the last `val_fraction` of them
    (one at least) are held out. A single document is cut instead: the tail of its tokens is held out."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if len(lengths) == 1:
        cut = int(lengths[0] * (1 - val_fraction))
        parts = {"train": (starts, np.array([cut])), "val": (starts + cut, lengths - cut)}
    else:
        order = np.arange(len(lengths))
        random.Random(seed).shuffle(order)  # a Python loop: ~2 s per million documents, once per preparation
        n_val = max(1, round(len(lengths) * val_fraction))
        parts = {"train": (starts[order[:-n_val]], lengths[order[:-n_val]]),
                 "val": (starts[order[-n_val:]], lengths[order[-n_val:]])}
    return {split: np.stack([piece_starts, np.cumsum(piece_lengths)]).astype(np.int64)
            for split, (piece_starts, piece_lengths) in parts.items()}


def load_streams(data_dir: str | Path, split: str) -> tuple[dict, dict[str, float]]:
    """Each source's `split` as a token stream (memory-mapped, nothing read yet), and its weight."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    if not manifest_path.exists():
        raise PocketError(f"{data_dir} holds no prepared data (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    streams, weights = {}, {}
    for name, entry in manifest["sources"].items():
        if manifest.get("format", 1) == 1:  # a run prepared before sharding still trains on its data
            path = data_dir / f"{name}.{split}.bin"
            if not path.exists():
                raise PocketError(f"{path} is missing: prepared data is incomplete, delete {data_dir} to redo it")
            streams[name] = np.memmap(path, dtype=manifest["dtype"], mode="r")
        else:
            streams[name] = TokenStream.open(data_dir / name, split)
        weights[name] = entry["weight"]
    return streams, weights


class MixtureLoader:
    """Yields (x, y) int64 batches of shape (batch_size, seq_len) for one rank; deterministic and resumable.
    A stream is anything with a length and contiguous slices: a TokenStream, or an array in memory."""

    def __init__(self, streams: dict, weights: dict[str, float], batch_size: int,
                 seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        for name, s in streams.items():
            if len(s) < seq_len + 1:
                raise PocketError(f"source {name!r} has {len(s)} tokens, fewer than seq_len+1 = {seq_len + 1}")
        self.names = sorted(streams)
        self.streams = streams
        total = sum(weights[n] for n in self.names)
        self.probs = np.array([weights[n] / total for n in self.names])
        self.B, self.T, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0
        self.cursors = {n: 0 for n in self.names}
        self.epochs = {n: 0 for n in self.names}
        self.rows_seen = {n: 0 for n in self.names}

    def state(self) -> dict:
        return {"step": self.step, "cursors": dict(self.cursors), "epochs": dict(self.epochs),
                "rows_seen": dict(self.rows_seen)}

    def load_state(self, state: dict) -> None:
        if set(state["cursors"]) != set(self.names):
            raise PocketError(f"data position is for sources {sorted(state['cursors'])}, "
                              f"but the mixture has {self.names}")
        self.step = state["step"]
        self.cursors, self.epochs = dict(state["cursors"]), dict(state["epochs"])
        self.rows_seen = dict(state.get("rows_seen", {n: 0 for n in self.names}))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step])
        choice = rng.choice(len(self.names), size=self.B * self.world_size, p=self.probs)
        rows = []
        for i, k in enumerate(choice):  # every rank advances every cursor: the state stays identical
            name = self.names[k]
            stream, pos = self.streams[name], self.cursors[name]
            if pos + self.T + 1 > len(stream):
                pos, self.epochs[name] = 0, self.epochs[name] + 1
            if i // self.B == self.rank:
                rows.append(np.asarray(stream[pos:pos + self.T + 1], dtype=np.int64))
            self.cursors[name] = pos + self.T
            self.rows_seen[name] += 1
        self.step += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def realised(self) -> dict[str, dict]:
        """What the model actually saw per source: share of rows, tokens, epochs (like LLaMA's table)."""
        total = max(1, sum(self.rows_seen.values()))
        return {n: {"weight": float(p), "share": self.rows_seen[n] / total,
                    "tokens": self.rows_seen[n] * self.T,
                    "epochs": self.epochs[n] + self.cursors[n] / len(self.streams[n])}
                for n, p in zip(self.names, self.probs)}
