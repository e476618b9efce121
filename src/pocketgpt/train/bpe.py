"""The tokenizer stage: learn a BPE vocabulary from a sample of the pretraining mixture."""

from __future__ import annotations

import time
from pathlib import Path

from ..common import PocketError, atomic_write_json, console
from ..data.sources import SourceSpec, document_text, iter_documents
from ..tokenizer import PATTERNS, BPETokenizer


def train_tokenizer(specs: list[SourceSpec], out_dir: str | Path, vocab_size: int = 4096,
                    max_chars: int = 20_000_000, pattern: str = "gpt4") -> dict:
    """Train on up to `max_chars` characters, split across sources by weight; report compression."""
    total_weight = sum(s.weight for s in specs)
    samples = {}
    for spec in specs:
        budget = int(max_chars * spec.weight / total_weight)
        docs, size = [], 0
        for doc in iter_documents(spec):  # streamed: a source may be larger than memory
            if size >= budget:
                break
            docs.append(document_text(doc)[: budget - size])
            size += len(docs[-1])
        samples[spec.name] = docs
    t0 = time.time()
    if pattern not in PATTERNS:
        raise PocketError(f"unknown split pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    tok = BPETokenizer.train((d for docs in samples.values() for d in docs), vocab_size, PATTERNS[pattern])
    if tok.vocab_size < vocab_size:  # the sample ran out of pairs to merge
        console.print(f"[yellow]the tokenizer has {tok.vocab_size} tokens, not the {vocab_size} asked: its sample "
                      "has no more pairs to merge (more text: tokenizer.max_chars)[/]")
    seconds = time.time() - t0
    out_dir = Path(out_dir)
    tok.save(out_dir / "tokenizer.json")
    # Compression per source: bytes per token (higher = the vocabulary fits that text better).
    compression = {}
    for name, docs in samples.items():
        text = "".join(docs[:200])
        compression[name] = len(text.encode("utf-8")) / max(1, len(tok.encode(text)))
    report = {"vocab_size": tok.vocab_size, "pattern": pattern, "train_chars": sum(len(d) for docs in samples.values() for d in docs),
              "train_seconds": seconds, "bytes_per_token": compression, "fingerprint": tok.fingerprint()}
    atomic_write_json(out_dir / "report.json", report)
    return report
