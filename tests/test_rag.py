"""Retrieval: token chunks, the three retrievers on the world's encyclopedia, an index that is not
rebuilt when nothing changed, one clear error for a corrupt index, answers that quote a passage, and
the commands."""

import json

import numpy as np
import pytest
from test_lm import run  # noqa: F401  (a tiny run directory)

from pocketgpt.cli import main
from pocketgpt.common import PocketError
from pocketgpt.data.tasks import default_world
from pocketgpt.data.tasks.prompts import passages_prompt
from pocketgpt.rag.answer import NOT_FOUND, ask, rag_request, sentences
from pocketgpt.rag.index import Embedder, build_index, load_index


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def world_docs():
    return {a["id"]: a["text"] for a in default_world().retrieval_corpus()}


@pytest.fixture(scope="module")
def world_index(tmp_path_factory, world_docs, embedder):
    return build_index(world_docs, tmp_path_factory.mktemp("rag") / "world.index", embedder=embedder)[0]


def test_chunks_are_overlapping_token_windows_of_the_text(embedder):
    text = " ".join(f"word{i}" for i in range(300))
    chunks = embedder.chunks("doc", text, size=50, overlap=10)
    assert len(chunks) > 3 and all(c.text in text for c in chunks)
    assert [c.id for c in chunks[:2]] == ["doc#0", "doc#1"]
    tail_of_first = chunks[0].text.split()[-2:]
    assert chunks[1].text.split()[:2] != chunks[0].text.split()[:2] and tail_of_first[-1] in chunks[1].text
    with pytest.raises(PocketError, match="must exceed the overlap"):
        embedder.chunks("doc", text, size=10, overlap=10)
    # MiniLM embeds a chunk's first 254 tokens: a fact beyond them could never be found
    with pytest.raises(PocketError, match="chunk size 1000 is above the 254 tokens the embedder reads"):
        embedder.chunks("doc", text, size=1000, overlap=10)


def test_a_document_with_unicode_line_separators_indexes_and_loads(tmp_path, embedder):
    """U+2028 and U+0085 in a chunk's text split chunks.jsonl's lines when it was read back: every later
    `rag ask` and rebuild failed with a JSONDecodeError traceback."""
    index, _ = build_index({"a.txt": "first\u2028second\u0085third line"}, tmp_path / "i", embedder=embedder)
    assert load_index(tmp_path / "i").chunks[0].text == "first\u2028second\u0085third line"


@pytest.mark.parametrize("retriever", ["bm25", "dense", "hybrid"])
def test_every_retriever_finds_the_entity_article(world_index, retriever):
    world = default_world()
    cities = world.entities("city")[:10]
    found = sum(world_index.search(f"What is the population of {c.name}?", 3, retriever)[0].chunk.document
                == f"city/{c.name.lower().replace(' ', '-')}" for c in cities)
    assert found >= 8, (retriever, found)


def test_a_second_build_does_no_work_and_a_change_redoes_one_document(tmp_path, world_docs, embedder):
    docs = dict(list(world_docs.items())[:12])
    _, first = build_index(docs, tmp_path / "i", embedder=embedder)
    again, second = build_index(docs, tmp_path / "i", embedder=embedder)
    assert first["embedded"] == 12 and second == {"documents": 12, "reused": 12, "embedded": 0, "changed": False}
    assert first["damaged"] is None
    name = next(iter(docs))
    docs[name] += " It also has a famous lighthouse."
    index, third = build_index(docs, tmp_path / "i", embedder=embedder)
    assert third["embedded"] == 1 and third["reused"] == 11
    assert "lighthouse" in index.search("famous lighthouse", 1, "bm25")[0].chunk.text
    reloaded = load_index(tmp_path / "i", embedder)
    assert np.array_equal(reloaded.embeddings, index.embeddings) and len(reloaded.chunks) == len(index.chunks)


def test_an_index_that_is_not_a_directory_is_one_error(tmp_path):
    (tmp_path / "garbage.db").write_text("x")  # `rag ask garbage.db` ended in NotADirectoryError
    with pytest.raises(PocketError, match="garbage.db is not an index directory"):
        load_index(tmp_path / "garbage.db")
    with pytest.raises(PocketError, match="nope does not exist"):
        load_index(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncate", "manifest", "missing"])
def test_a_corrupt_index_is_one_clear_error(tmp_path, world_docs, embedder, damage):
    build_index(dict(list(world_docs.items())[:3]), tmp_path / "i", embedder=embedder)
    if damage == "truncate":
        data = (tmp_path / "i" / "embeddings.npy").read_bytes()
        (tmp_path / "i" / "embeddings.npy").write_bytes(data[:len(data) // 2])
    elif damage == "manifest":
        (tmp_path / "i" / "manifest.json").write_text("{not json")
    else:
        (tmp_path / "i" / "chunks.jsonl").unlink()
    with pytest.raises(PocketError, match="not a usable index"):
        load_index(tmp_path / "i")
    index, stats = build_index(dict(list(world_docs.items())[:3]), tmp_path / "i", embedder=embedder)
    assert "not a usable index" in stats["damaged"] and stats["embedded"] == 3  # `rag index` repairs it
    assert len(load_index(tmp_path / "i").chunks) == len(index.chunks)


def test_an_index_is_never_built_over_a_folder_of_other_files(tmp_path, world_docs, embedder, capsys):
    """`rag index docs --out docs` replaced the documents with the index (a rebuild renames the old folder
    away and deletes it); so did --out on any folder of the user's, or on a document."""
    docs = dict(list(world_docs.items())[:2])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "a.txt").write_text("keep me too")
    for out, what in ((tmp_path / "mine", "it holds notes.txt"), (tmp_path / "a.txt", "a file")):
        with pytest.raises(PocketError, match=f"is not an index \\({what}\\)"):
            build_index(docs, out, embedder=embedder)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (tmp_path / "a.txt").read_text() == "keep me too"
    assert main(["rag", "index", str(tmp_path / "mine"), "--out", str(tmp_path / "mine" / "idx")]) != 0
    assert "lies inside the documents' folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    with pytest.raises(PocketError, match="the 2 documents hold no text"):  # it built, then `rag ask` crashed
        build_index({"a.txt": " \n", "b.md": ""}, tmp_path / "blank", embedder=embedder)
    (tmp_path / "empty").mkdir()
    assert build_index(docs, tmp_path / "empty", embedder=embedder)[1]["embedded"] == 2  # an empty folder may hold it
    for sibling in ("empty.tmp", "empty.old"):  # the user's, beside the index: a rebuild deleted them
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "notes.txt").write_text("keep me")
    build_index(dict(list(world_docs.items())[:3]), tmp_path / "empty", embedder=embedder)
    assert all((tmp_path / sibling / "notes.txt").exists() for sibling in ("empty.tmp", "empty.old"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing of the build left


def test_passages_prompt_names_each_chunk():
    prompt = passages_prompt("When was Lisin founded?", [("city/lisin#0", "Lisin was founded in 1610.")])
    assert "[city/lisin#0] Lisin was founded in 1610." in prompt and prompt.endswith("Question: When was Lisin founded?")


def test_sentences_split_at_stops_not_inside_numbers():
    assert sentences("Lisin has 2.5 million people. Is it big? Yes!\n# Notes\n小明有书。他读书。") == [
        "Lisin has 2.5 million people.", "Is it big?", "Yes!", "# Notes", "小明有书。", "他读书。"]


def test_a_quoting_answer_is_held_to_the_passages_and_cites_the_one_it_quotes(world_index, scripted):
    def reply(messages, request):
        from pocketgpt.reason.lm import Generation

        assert request.choices and all(c in messages[0]["content"] for c in request.choices)
        return [Generation(request.choices[-1], "stop")]  # a model that picks the last sentence offered

    question = "When was Lisin founded?"
    answer = ask(scripted(reply), world_index, question, k=3, quote=True)
    holders = [h.chunk.id for h in answer.hits if answer.text in sentences(h.chunk.text)]
    assert answer.cited == holders and len(holders) >= 1 and len(answer.hits) == 3


def test_a_quote_cut_short_by_the_context_is_refused_not_printed(world_index, scripted):
    """Passages that fill a 128-token context left room for one token: "The" was printed as the quote."""
    from pocketgpt.reason.lm import Generation

    model = scripted(lambda messages, request: [Generation("The", "length")])
    with pytest.raises(PocketError, match="no room to quote a whole sentence of them: ask with a lower --k"):
        ask(model, world_index, "When was Lisin founded?", k=3, quote=True)


def test_with_nothing_retrieved_a_quoting_answer_can_only_say_it_does_not_know():
    assert rag_request("When was Lisin founded?", [], quote=True).choices == (NOT_FOUND,)


def test_rag_commands(tmp_path, capsys):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Otters\nSea otters hold hands while they sleep.")
    (folder / "sub" / "b.txt").write_text("The Eiffel tower was finished in 1889.")
    (folder / "c.bin").write_bytes(b"\x00\x01")
    assert main(["rag", "index", str(folder), "--out", str(tmp_path / "idx")]) == 0
    assert "2 documents" in capsys.readouterr().out
    assert main(["rag", "index", str(folder), "--out", str(tmp_path / "idx")]) == 0
    assert "nothing changed" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert set(manifest["documents"]) == {"a.md", "sub/b.txt"}
    with pytest.raises(SystemExit):
        main(["rag", "index", "--out", str(tmp_path / "x"), "--bogus"])
    assert main(["rag", "index", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) != 0


def test_rag_ask_quotes_a_sentence_and_cites_its_chunk(tmp_path, capsys, run):  # noqa: F811
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "dentist.md").write_text("# Dentist\nThe appointment is on Tuesday at 3 pm. Bring the card.")
    (folder / "todo.txt").write_text("Buy milk and eggs. The car needs new tires.")
    assert main(["rag", "index", str(folder), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["rag", "ask", str(tmp_path / "idx"), "When is the dentist?", "--model", str(run), "--quote",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("[dentist.md#0] ") for line in lines)  # the passages, with their ids
    by_chunk = {"dentist.md#0": ["# Dentist", "The appointment is on Tuesday at 3 pm.", "Bring the card."],
                "todo.txt#0": ["Buy milk and eggs.", "The car needs new tires."]}
    answer, cites = lines[-2], lines[-1]
    assert cites == "cites: " + ", ".join(cid for cid, said in by_chunk.items() if answer in said)
