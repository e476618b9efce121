"""The pretraining mixture: tokenize each source once, then draw B x (T+1) rows from them by weight.

Preparation turns every source into two token streams on disk (train and validation): its
documents in a seeded shuffled order, each preceded by <|bos|>, concatenated. Rows are contiguous
windows of a stream, so a row may span documents, separated by <|bos|> as in GPT pretraining.

Which source feeds which row of global step s is a pure function of (seed, s); each source keeps a
cursor that moves through its stream and wraps around (one more epoch). The loader's whole state is
therefore {step, cursors, epochs}: saved with a checkpoint, it resumes the exact same batches. Under
torchrun every process computes the same global assignment, moves every cursor, and takes its own
slice of rows: the state is the global position, the same in every process and for any number of
processes, so a run started with N processes resumes with M (B x M rows per step from then on).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..chat import ChatTemplate
from ..common import PocketError, atomic_write_bytes, atomic_write_json
from .sources import SourceSpec, document_text, read_documents

MANIFEST = "mixture.json"


def _spec_key(specs: list[SourceSpec], chat: ChatTemplate, val_fraction: float, seed: int) -> str:
    blob = json.dumps([asdict(s) for s in specs] + [chat.tokenizer.fingerprint(), val_fraction, seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_mixture(specs: list[SourceSpec], chat: ChatTemplate, out_dir: str | Path,
                    val_fraction: float = 0.02, seed: int = 0, threads: int = 2) -> dict:
    """Tokenize every source into out_dir/{name}.{train,val}.bin; reuse them if nothing changed."""
    out_dir = Path(out_dir)
    key = _spec_key(specs, chat, val_fraction, seed)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            return manifest
    dtype = np.uint16 if chat.tokenizer.vocab_size <= 65536 else np.uint32
    manifest = {"key": key, "dtype": np.dtype(dtype).name, "sources": {}}
    for spec in specs:
        docs = read_documents(spec)
        random.Random(f"{seed}:{spec.name}").shuffle(docs)
        if len(docs) > 1:
            n_val = max(1, round(len(docs) * val_fraction))
            train_docs, val_docs = docs[:-n_val], docs[-n_val:]
        elif isinstance(docs[0], str):  # a single text: hold out its tail
            cut = int(len(docs[0]) * (1 - val_fraction))
            train_docs, val_docs = [docs[0][:cut]], [docs[0][cut:]]
        else:  # a single conversation cannot be split
            train_docs = val_docs = docs
        entry = {"weight": spec.weight, "kind": spec.kind, "documents": len(docs),
                 "bytes": sum(len(document_text(d).encode("utf-8")) for d in docs)}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            stream = np.fromiter((t for doc in encode_documents(chat, split_docs, threads) for t in doc),
                                 dtype=dtype)
            atomic_write_bytes(out_dir / f"{spec.name}.{split}.bin", stream.tobytes())
            entry[f"{split}_tokens"] = int(stream.size)
        manifest["sources"][spec.name] = entry
    atomic_write_json(manifest_path, manifest)
    return manifest


def encode_documents(chat: ChatTemplate, docs: list, threads: int) -> list[list[int]]:
    """Each text as a whole document (ours: <|bos|> + tokens); a conversation rendered by the chat template."""
    encoded = iter(chat.documents([d for d in docs if isinstance(d, str)], threads=threads))
    return [next(encoded) if isinstance(d, str) else chat.render(d)[0] for d in docs]


def load_streams(data_dir: str | Path, split: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    if not manifest_path.exists():
        raise PocketError(f"{data_dir} holds no prepared data (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    streams, weights = {}, {}
    for name, entry in manifest["sources"].items():
        path = data_dir / f"{name}.{split}.bin"
        if not path.exists():
            raise PocketError(f"{path} is missing: prepared data is incomplete, delete {data_dir} to redo it")
        streams[name] = np.memmap(path, dtype=manifest["dtype"], mode="r")
        weights[name] = entry["weight"]
    return streams, weights


class MixtureLoader:
    """Yields (x, y) int64 batches of shape (batch_size, seq_len) for one rank; deterministic and resumable."""

    def __init__(self, streams: dict[str, np.ndarray], weights: dict[str, float], batch_size: int,
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
