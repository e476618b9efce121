import dataclasses
import json
import math
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from pocketgpt.common import PocketError, read_jsonl
from pocketgpt.data import shards
from pocketgpt.data.mixture import MixtureLoader, load_streams, prepare_mixture
from pocketgpt.data.shards import encode_documents
from pocketgpt.data.sources import SourceSpec, read_documents


@pytest.fixture()
def user_sources(tmp_path):
    (tmp_path / "texts").mkdir()
    for i in range(5):
        (tmp_path / "texts" / f"{i}.txt").write_text(f"document number {i}. " * 6)
    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"jsonl record {i} " * 30}) + "\n")
    return [SourceSpec.from_dict("files", {"kind": "text", "path": str(tmp_path / "texts"), "weight": 1}),
            SourceSpec.from_dict("records", {"kind": "jsonl", "path": str(tmp_path / "a.jsonl"), "weight": 3})]


def test_builtin_sources_exist_everywhere():
    assert len(read_documents(SourceSpec("docs", "docs"))) > 50
    code = read_documents(SourceSpec("code", "code", max_bytes=200_000))
    assert any("def " in d for d in code)
    assert sum(len(d.encode()) for d in code[:-1]) < 200_000


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one doc", None, "two doc"]}), tmp_path / "d.parquet")
    assert read_documents(SourceSpec("p", "parquet", path=str(tmp_path / "d.parquet"), field="body")) == \
        ["one doc", "two doc"]  # a missing value is no document


def test_bad_files_in_a_folder_source_are_named_in_one_line(tmp_path):
    """Tracebacks before (ArrowInvalid, IsADirectoryError), or an int column read as "no documents"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a doc"]}), folder / "a.parquet")
    (folder / "spark.parquet").mkdir()  # a folder named like a file is not one of the folder's files
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("a text")
    (tmp_path / "txt" / "notes.md").mkdir()
    assert read_documents(SourceSpec("p", "parquet", path=str(folder))) == ["a doc"]
    assert read_documents(SourceSpec("t", "text", path=str(tmp_path / "txt"))) == ["a text"]
    (folder / "b.parquet").write_text("hello")
    with pytest.raises(PocketError, match=r"b.parquet: not a Parquet file"):
        read_documents(SourceSpec("p", "parquet", path=str(folder)))
    pq.write_table(pa.table({"text": [1, 2]}), folder / "b.parquet")
    with pytest.raises(PocketError, match=r"b.parquet: column 'text' holds int values, not text \(e.g. '1'\)"):
        read_documents(SourceSpec("p", "parquet", path=str(folder)))


def test_bad_sources_say_where(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(PocketError, match=r"bad.jsonl:2: malformed JSON"):
        read_documents(SourceSpec("b", "jsonl", path=str(bad)))
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(PocketError, match=r"bad.jsonl:1: expected an object with a string field 'text'"):
        read_documents(SourceSpec("b", "jsonl", path=str(bad)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PocketError, match="'e' .* has no documents"):
        read_documents(SourceSpec("e", "text", path=str(tmp_path / "empty")))
    with pytest.raises(PocketError, match="does not exist"):
        read_documents(SourceSpec("m", "text", path=str(tmp_path / "missing")))
    with pytest.raises(PocketError, match="unknown kind"):
        SourceSpec.from_dict("x", {"kind": "tweets"})
    for name in ("..", ".", "../../x", "a/b", ""):  # ".." named the run's own folder, whose files were cleared
        with pytest.raises(PocketError, match="as it names the source's folder in RUN/data"):
            SourceSpec.from_dict(name, {"kind": "text", "path": "x"})
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # Latin-1: a UnicodeDecodeError traceback
    with pytest.raises(PocketError, match=r"bad.jsonl:2: not UTF-8 text \(byte 14 of the line\)"):
        read_documents(SourceSpec("b", "jsonl", path=str(bad)))
    # tracebacks, or a typo kept and never read, before
    for setting, message in (({"weight": "abc"}, "weight must be a number >= 0"), ({"weight": float("inf")}, "weight"),
                             ({"max_docs": "abc"}, "max_docs must be a whole number >= 0"),
                             ({"path": 5}, "path must be a string"),
                             ({"wieght": 2}, "unknown setting 'wieght' \\(a text source takes field, kind, max_bytes")):
        with pytest.raises(PocketError, match=message):
            SourceSpec.from_dict("d", {"kind": "text", "path": "x", **setting})
    assert SourceSpec.from_dict("h", {"kind": "hf", "path": "x", "split": "test"}).options == {"split": "test"}
    # A generated kind takes its generator's settings: `math.bogus` was a TypeError when the data was prepared.
    for kind, takes in (("math", "n, path, seed"), ("world", "n_cities"), ("spelling", "words_per_doc"),
                        ("chat", "tasks")):
        with pytest.raises(PocketError, match=f"unknown setting 'bogus' \\(a {kind} source takes .*{takes}"):
            SourceSpec.from_dict("g", {"kind": kind, "bogus": 1})
    assert SourceSpec.from_dict("m", {"kind": "repeats", "episodes": 2}).options == {"episodes": 2}


@pytest.mark.parametrize("damage", ["truncated shard", "deleted shard", "source.json", "mixture.json", "train.npy",
                                    "val.npy"])
def test_damaged_prepared_data_is_prepared_again(user_sources, chat, tmp_path, damage):
    """Each of these ended in a traceback (IndexError, FileNotFoundError, JSONDecodeError, ValueError) or in an
    error that told the user to run the stage again, which failed the same way every time."""
    prepare_mixture(user_sources, chat, tmp_path / "data", val_fraction=0.2)
    before = {name: stream[:].copy() for name, stream in load_streams(tmp_path / "data", "train")[0].items()}
    source = tmp_path / "data" / "records"
    if damage == "truncated shard":
        (source / "shard_00000.bin").write_bytes((source / "shard_00000.bin").read_bytes()[:10])
    elif damage == "deleted shard":
        (source / "shard_00000.bin").unlink()
    elif damage == "source.json":
        (source / "source.json").write_text("{not json")
    elif damage == "mixture.json":
        (tmp_path / "data" / "mixture.json").write_text("[")
    elif damage == "train.npy":
        (source / "train.npy").write_bytes(b"junk")
    else:
        (source / "val.npy").unlink()
    prepare_mixture(user_sources, chat, tmp_path / "data", val_fraction=0.2)
    after = {name: stream[:] for name, stream in load_streams(tmp_path / "data", "train")[0].items()}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


def test_prepare_packs_documents_with_bos(user_sources, chat, tmp_path):
    manifest = prepare_mixture(user_sources, chat, tmp_path / "data", val_fraction=0.2)
    streams, weights = load_streams(tmp_path / "data", "train")
    assert weights == {"files": 1, "records": 3}
    assert (streams["records"][:] == chat.document_start[0]).sum() == 16  # 20 docs, 4 held out
    assert manifest["sources"]["records"]["val_tokens"] > 0
    again = prepare_mixture(user_sources, chat, tmp_path / "data", val_fraction=0.2)
    assert again == manifest


def test_loader_deterministic_resumable_and_weighted(user_sources, chat, tmp_path):
    prepare_mixture(user_sources, chat, tmp_path / "data")
    streams, weights = load_streams(tmp_path / "data", "train")
    a = MixtureLoader(streams, weights, batch_size=4, seq_len=16, seed=1)
    batches = [a.next_batch() for _ in range(30)]
    x, y = batches[0]
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    b = MixtureLoader(streams, weights, batch_size=4, seq_len=16, seed=1)
    for _ in range(10):
        b.next_batch()
    c = MixtureLoader(streams, weights, batch_size=4, seq_len=16, seed=1)
    c.load_state(json.loads(json.dumps(b.state())))
    for want in batches[10:]:
        got = c.next_batch()
        assert (got[0] == want[0]).all()
    share = a.realised()["records"]["share"]
    assert 0.6 < share < 0.9  # weight 3 of 4
    assert a.realised()["files"]["epochs"] > 1  # the small source wraps around


def test_ranks_split_the_global_batch(user_sources, chat, tmp_path):
    prepare_mixture(user_sources, chat, tmp_path / "data")
    streams, weights = load_streams(tmp_path / "data", "train")
    whole = MixtureLoader(streams, weights, batch_size=4, seq_len=16, seed=2)
    parts = [MixtureLoader(streams, weights, batch_size=2, seq_len=16, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        x, _ = whole.next_batch()
        joined = np.concatenate([p.next_batch()[0].numpy() for p in parts])
        assert (x.numpy() == joined).all()


def test_short_source_is_an_error(tokenizer, tmp_path):
    streams = {"tiny": np.array([1, 2, 3], dtype=np.uint16)}
    with pytest.raises(PocketError, match="fewer than seq_len"):
        MixtureLoader(streams, {"tiny": 1.0}, batch_size=1, seq_len=8)


# ----------------------------------------------------------------------------- token shards


def write_jsonl(path, n, start=0):
    with open(path, "a") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"text": f"record {i}: " + "some words to tokenize " * (1 + i % 7)}) + "\n")


@pytest.fixture()
def records(tmp_path):
    write_jsonl(tmp_path / "records.jsonl", 60)
    return SourceSpec.from_dict("records", {"kind": "jsonl", "path": str(tmp_path / "records.jsonl")})


@pytest.fixture()
def count_encoded(monkeypatch):
    """Counts the documents the tokenizer encodes (one process: the pool is not used with workers=1)."""
    seen = []
    original = shards.encode_batch

    def counting(chat, docs, dtype, threads=1):
        seen.extend(docs)
        return original(chat, docs, dtype, threads)

    monkeypatch.setattr(shards, "encode_batch", counting)
    monkeypatch.setattr(shards, "BATCH_DOCS", 4)  # many small batches, so shards finish along the way
    return seen


def shard_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name.startswith("shard_")}


def test_shards_hold_whole_documents_and_are_reused(records, chat, tmp_path, count_encoded):
    manifest = prepare_mixture([records], chat, tmp_path / "data", shard_tokens=300)
    source = json.loads((tmp_path / "data" / "records" / "source.json").read_text())
    assert source["complete"] and source["dtype"] == "uint16" and source["tokenizer"] == chat.tokenizer.fingerprint()
    assert len(source["shards"]) == manifest["sources"]["records"]["shards"] > 3
    assert all(s["tokens"] <= 300 for s in source["shards"])
    assert sum(s["documents"] for s in source["shards"]) == source["documents"] == 60 == len(count_encoded)
    # each shard starts with a document's <|bos|>: documents are never cut between shards
    for s in source["shards"]:
        assert np.fromfile(tmp_path / "data" / "records" / s["file"], dtype=np.uint16)[0] == chat.document_start[0]

    count_encoded.clear()
    assert prepare_mixture([records], chat, tmp_path / "data", shard_tokens=300) == manifest
    assert count_encoded == []  # a second prepare does no work
    reweighted = prepare_mixture([dataclasses.replace(records, weight=5.0)], chat, tmp_path / "data",
                                 val_fraction=0.1, shard_tokens=300)
    assert count_encoded == []  # weights and splits are not tokenization: the shards are reused
    assert reweighted["sources"]["records"]["weight"] == 5.0
    assert reweighted["sources"]["records"]["val_tokens"] > manifest["sources"]["records"]["val_tokens"]


def test_files_a_source_does_not_read_leave_it_as_it_was(chat, tmp_path, count_encoded):
    """A README, a _SUCCESS marker or an editor's swap file beside the data counted in the source's hash: the
    whole source was tokenized again."""
    folder = tmp_path / "src"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", 20)
    spec = SourceSpec("records", "jsonl", path=str(folder))
    prepare_mixture([spec], chat, tmp_path / "data", shard_tokens=300)
    count_encoded.clear()
    for stray in ("_SUCCESS", "README.md", ".part.jsonl.swp", "_tmp/x.crc"):
        (folder / stray).parent.mkdir(exist_ok=True)
        (folder / stray).write_text("x")
    prepare_mixture([spec], chat, tmp_path / "data", shard_tokens=300)
    assert count_encoded == []
    write_jsonl(folder / "more.jsonl", 2)  # a file it reads: tokenized again
    prepare_mixture([spec], chat, tmp_path / "data", shard_tokens=300)
    assert len(count_encoded) == 22


def test_a_changed_source_or_tokenizer_is_tokenized_again(records, chat, hf_chat, tmp_path, count_encoded):
    prepare_mixture([records], chat, tmp_path / "data", shard_tokens=300)
    count_encoded.clear()
    write_jsonl(records.path, 5, start=60)  # the file changed: its size and time are part of the source's hash
    grown = prepare_mixture([records], chat, tmp_path / "data", shard_tokens=300)
    assert grown["sources"]["records"]["documents"] == len(count_encoded) == 65
    count_encoded.clear()
    other = prepare_mixture([records], hf_chat, tmp_path / "data", shard_tokens=300)
    assert len(count_encoded) == 65
    source = json.loads((tmp_path / "data" / "records" / "source.json").read_text())
    assert source["tokenizer"] == hf_chat.tokenizer.fingerprint() != chat.tokenizer.fingerprint()
    assert other["sources"]["records"]["train_tokens"] != grown["sources"]["records"]["train_tokens"]
    streams, _ = load_streams(tmp_path / "data", "train")
    assert (streams["records"][:] == hf_chat.document_end[0]).sum() == 65 - 1  # ChatML ends each document
    count_encoded.clear()
    prepare_mixture([records], hf_chat, tmp_path / "data", shard_tokens=200)
    assert len(count_encoded) == 65  # another shard size: other files


def test_the_same_shards_whatever_the_number_of_workers(records, chat, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_DOCS", 4)
    prepare_mixture([records], chat, tmp_path / "one", shard_tokens=300, workers=1)
    prepare_mixture([records], chat, tmp_path / "two", shard_tokens=300, workers=2)
    one, two = shard_files(tmp_path / "one" / "records"), shard_files(tmp_path / "two" / "records")
    assert len(one) > 6 and one == two


KILL_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from pocketgpt.chat import PocketTemplate
from pocketgpt.data import shards
from pocketgpt.data.mixture import prepare_mixture
from pocketgpt.data.sources import SourceSpec
from pocketgpt.tokenizer import Tokenizer

shards.BATCH_DOCS = 4
append = shards.ShardWriter._append
def append_then_die(self, tokens, sizes):
    append(self, tokens, sizes)
    if self.index == 3:  # shards 0-2 are complete, the fourth is half written
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter._append = append_then_die
tmp = Path(sys.argv[1])
spec = SourceSpec("records", "jsonl", path=str(tmp / "records.jsonl"))
prepare_mixture([spec], PocketTemplate(Tokenizer.load(tmp / "tok.json")), tmp / "data", shard_tokens=300)
"""


def test_a_killed_prepare_keeps_its_finished_shards_and_resumes(records, chat, tmp_path, count_encoded):
    chat.tokenizer.save(tmp_path / "tok.json")
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, str(tmp_path)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    directory = tmp_path / "data" / "records"
    assert sorted(p.name for p in directory.iterdir()) == [
        ".shard_00003.bin.tmp", "shard_00000.bin", "shard_00000.docs.npy", "shard_00001.bin",
        "shard_00001.docs.npy", "shard_00002.bin", "shard_00002.docs.npy", "source.json"]
    assert not json.loads((directory / "source.json").read_text())["complete"]
    kept = {name: (directory / name).stat().st_mtime_ns for name in shard_files(directory)}

    prepare_mixture([records], chat, tmp_path / "data", shard_tokens=300)
    source = json.loads((directory / "source.json").read_text())
    done = sum(s["documents"] for s in source["shards"][:3])
    assert source["resumed_after_documents"] == done > 0
    assert len(count_encoded) == 60 - done  # only what the finished shards did not hold was encoded
    assert all((directory / name).stat().st_mtime_ns == t for name, t in kept.items())
    assert not list(directory.glob(".*tmp"))
    prepare_mixture([records], chat, tmp_path / "fresh", shard_tokens=300)
    assert shard_files(directory) == shard_files(tmp_path / "fresh" / "records")


def test_an_interrupted_prepare_leaves_no_half_shard(records, chat, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_DOCS", 4)
    real = shards.iter_documents

    def interrupted(spec):
        for i, doc in enumerate(real(spec)):
            if i == 30:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(shards, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_mixture([records], chat, tmp_path / "data", shard_tokens=300)
    directory = tmp_path / "data" / "records"
    assert not list(directory.glob(".*tmp")) and list(directory.glob("shard_*.bin"))
    monkeypatch.setattr(shards, "iter_documents", real)
    prepare_mixture([records], chat, tmp_path / "data", shard_tokens=300)
    prepare_mixture([records], chat, tmp_path / "fresh", shard_tokens=300)
    assert shard_files(directory) == shard_files(tmp_path / "fresh" / "records")


def in_memory_streams(specs, chat, val_fraction, seed):
    """The mixture as it was prepared before shards: every source read, shuffled and encoded in memory."""
    streams = {}
    for spec in specs:
        docs = read_documents(spec)
        random.Random(f"{seed}:{spec.name}").shuffle(docs)
        n_val = max(1, round(len(docs) * val_fraction))
        streams[spec.name] = np.array([t for ids in encode_documents(chat, docs[:-n_val]) for t in ids])
    return streams


def test_batches_are_those_of_the_in_memory_mixture(user_sources, records, chat, tmp_path):
    specs = [*user_sources, dataclasses.replace(records, name="more")]
    prepare_mixture(specs, chat, tmp_path / "data", val_fraction=0.1, seed=4, shard_tokens=256)
    streams, weights = load_streams(tmp_path / "data", "train")
    before = in_memory_streams(specs, chat, 0.1, 4)
    for name, stream in streams.items():
        assert (stream[:] == before[name]).all()
    sharded = MixtureLoader(streams, weights, batch_size=4, seq_len=32, seed=4)
    in_memory = MixtureLoader(before, weights, batch_size=4, seq_len=32, seed=4)
    for _ in range(150):  # enough for every source to wrap around
        assert (sharded.next_batch()[0] == in_memory.next_batch()[0]).all()
    assert all(e >= 1 for e in (r["epochs"] for r in sharded.realised().values()))


def test_token_stream_slices_across_documents_and_shards(records, chat, tmp_path):
    prepare_mixture([records], chat, tmp_path / "data", shard_tokens=100)
    stream, _ = load_streams(tmp_path / "data", "train")
    stream = stream["records"]
    whole = stream[:]
    assert len(whole) == len(stream) and whole.dtype == np.uint16
    rng = np.random.default_rng(0)
    for start in rng.integers(0, len(stream) - 1, 50):
        stop = start + rng.integers(1, 400)
        assert (stream[start:stop] == whole[start:stop]).all()
    with pytest.raises(TypeError, match="contiguous slices"):
        stream[::2]


def test_a_single_document_holds_out_the_tail_of_its_tokens(chat, tmp_path):
    (tmp_path / "book.txt").write_text("one long book. " * 400)
    spec = SourceSpec("book", "text", path=str(tmp_path / "book.txt"))
    manifest = prepare_mixture([spec], chat, tmp_path / "data", val_fraction=0.25)
    train, val = (load_streams(tmp_path / "data", split)[0]["book"][:] for split in ("train", "val"))
    assert manifest["sources"]["book"]["documents"] == 1
    whole = np.concatenate([train, val])
    assert (whole == np.array(chat.documents(read_documents(spec))[0])).all()
    assert len(val) == len(whole) - int(len(whole) * 0.75)


def test_data_prepared_before_shards_still_loads(chat, tmp_path):
    stream = np.arange(100, dtype=np.uint16)
    stream.tofile(tmp_path / "old.train.bin")
    (tmp_path / "mixture.json").write_text(json.dumps({"key": "k", "dtype": "uint16", "sources": {"old": {"weight": 2}}}))
    streams, weights = load_streams(tmp_path, "train")
    assert weights == {"old": 2} and (streams["old"][10:20] == stream[10:20]).all()


def test_bad_input_names_the_file_and_line_when_sharding(chat, tmp_path):
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, 30)
    with open(bad, "a") as f:
        f.write('{"text": "unterminated\n')
    with pytest.raises(PocketError, match=r"bad.jsonl:31: malformed JSON"):
        prepare_mixture([SourceSpec("bad", "jsonl", path=str(bad))], chat, tmp_path / "data")
    assert not (tmp_path / "data" / "mixture.json").exists()
    twice = SourceSpec("bad", "jsonl", path=str(bad))
    with pytest.raises(PocketError, match="names a source more than once: bad"):
        prepare_mixture([twice, twice], chat, tmp_path / "data")


# ----------------------------------------------------------------------------- more than 65,536 tokens


def big_vocabulary_tokenizer(n_words=70_000):
    """A word-level Hugging Face tokenizer with our special tokens after 70,000 words: ids need 32 bits."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    from pocketgpt.tokenizer import SPECIAL_TOKENS, HFTokenizer

    hf = HF(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(n_words)}}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(SPECIAL_TOKENS)
    return HFTokenizer(hf)


def test_token_dtype_follows_the_vocabulary():
    assert shards.token_dtype(4096) == np.uint16 and shards.token_dtype(65_536) == np.uint16
    assert shards.token_dtype(65_537) == np.uint32 and shards.token_dtype(128_256) == np.uint32


def test_a_vocabulary_over_65536_tokens_trains_end_to_end(tmp_path):
    from pocketgpt.train.loop import TrainConfig
    from pocketgpt.train.pretrain import PretrainConfig, pretrain

    tokenizer = big_vocabulary_tokenizer()
    assert tokenizer.vocab_size > 70_000
    run = tmp_path / "run"
    tokenizer.save(run / "tokenizer" / "tokenizer.json")
    rng = np.random.default_rng(0)
    with open(tmp_path / "words.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(0, 70_000, 60))}) + "\n")
    cfg = PretrainConfig(preset="tiny", sources={"words": {"kind": "jsonl", "path": str(tmp_path / "words.jsonl")}},
                         train=TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
                                           eval_batches=1, sample_every=1000, save_every=1000, log_every=1,
                                           threads=1, dtype="float32"))
    summary = pretrain(cfg, run)
    manifest = json.loads((run / "data" / "mixture.json").read_text())
    assert manifest["dtype"] == "uint32"
    shard = run / "data" / "words" / "shard_00000.bin"
    assert shard.stat().st_size == 4 * manifest["sources"]["words"]["train_tokens"] + \
        4 * manifest["sources"]["words"]["val_tokens"]
    streams, weights = load_streams(run / "data", "train")
    x, y = MixtureLoader(streams, weights, batch_size=4, seq_len=32).next_batch()
    assert x.max() > 65_535 and y.max() > 65_535  # ids a uint16 would have wrapped around
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert math.isfinite(summary["val_loss"]) and summary["realised_mixture"]["words"]["tokens"] == 3 * 4 * 32


# ----------------------------------------------------------------------------- Hugging Face datasets on disk


def test_hf_dataset_from_disk_and_from_a_folder_of_files(chat, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": [f"saved row {i}" for i in range(30)]}),
                          "test": datasets.Dataset.from_dict({"body": ["held"]})}).save_to_disk(tmp_path / "saved")
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "part0.jsonl", 20)
    saved = SourceSpec.from_dict("saved", {"kind": "hf", "path": str(tmp_path / "saved"), "field": "body"})
    files = SourceSpec.from_dict("files", {"kind": "hf", "path": str(tmp_path / "files")})
    assert read_documents(saved)[:2] == ["saved row 0", "saved row 1"]
    assert read_documents(SourceSpec.from_dict("t", {"kind": "hf", "path": str(tmp_path / "saved"),
                                                     "field": "body", "split": "test"})) == ["held"]
    one_file = str(tmp_path / "files" / "part0.jsonl")
    assert read_documents(files) == read_documents(SourceSpec("j", "jsonl", path=one_file))
    # One file is read by its format's builder: as a bare path, `datasets` took it for a Hub name (26 s of retries).
    assert read_documents(SourceSpec.from_dict("f", {"kind": "hf", "path": one_file})) == read_documents(files)
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(PocketError, match="a file `datasets` cannot read by its suffix"):
        read_documents(SourceSpec.from_dict("f", {"kind": "hf", "path": str(tmp_path / "notes.docx")}))
    manifest = prepare_mixture([saved, files], chat, tmp_path / "data")
    assert manifest["sources"]["saved"]["documents"] == 30 and manifest["sources"]["files"]["documents"] == 20
    with pytest.raises(PocketError, match="no split 'validation'"):
        read_documents(dataclasses.replace(saved, options={"split": "validation"}))
    with pytest.raises(PocketError, match="no column 'text'"):
        read_documents(dataclasses.replace(saved, field="text"))
    # one saved Dataset is one split: another one asked of it was read as the whole
    datasets.Dataset.from_dict({"body": ["only"], "n": [1]}, split="train").save_to_disk(tmp_path / "one")
    one = SourceSpec.from_dict("one", {"kind": "hf", "path": str(tmp_path / "one"), "field": "body"})
    assert read_documents(one) == read_documents(dataclasses.replace(one, options={"split": "train"})) == ["only"]
    with pytest.raises(PocketError, match="a saved dataset of one split \\(train\\), not 'test'"):
        read_documents(dataclasses.replace(one, options={"split": "test"}))
    with pytest.raises(PocketError, match="column 'n' holds int values, not text"):
        read_documents(dataclasses.replace(one, field="n"))


def test_hf_dataset_without_the_datasets_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(PocketError, match="needs the Hugging Face `datasets` package: pip install datasets"):
        read_documents(SourceSpec("d", "hf", path=str(tmp_path)))


def test_the_chat_source_renders_a_task_again_in_each_style_it_also_names():
    def spec(entry) -> SourceSpec:
        return SourceSpec("chat", "chat", options={"tasks": {"multihop": entry}})

    worked = read_documents(spec("cot"))
    both = read_documents(spec({"style": "cot", "also": ["tool"]}))
    assert both[:len(worked)] == worked and len(both) == 2 * len(worked)
    assert not any(m["role"] == "tool" for c in worked for m in c)
    assert all(any(m["role"] == "tool" for m in c) for c in both[len(worked):])
    with pytest.raises(PocketError, match="'multihop' takes a style or"):
        read_documents(spec({"styles": "cot"}))
