import json

import numpy as np
import pytest

from pocketgpt.common import PocketError
from pocketgpt.data.mixture import MixtureLoader, load_streams, prepare_mixture
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

    pq.write_table(pa.table({"body": ["one doc", "two doc"]}), tmp_path / "d.parquet")
    assert read_documents(SourceSpec("p", "parquet", path=str(tmp_path / "d.parquet"), field="body")) == \
        ["one doc", "two doc"]


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


def test_prepare_packs_documents_with_bos(user_sources, chat, tmp_path):
    manifest = prepare_mixture(user_sources, chat, tmp_path / "data", val_fraction=0.2)
    streams, weights = load_streams(tmp_path / "data", "train")
    assert weights == {"files": 1, "records": 3}
    assert (streams["records"] == chat.document_start[0]).sum() == 16  # 20 docs, 4 held out
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
