"""Exported folders are read by transformers, tokenizers, PEFT and tiktoken exactly as we read them."""

import json
import os
from collections.abc import Mapping

import pytest
import torch

from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.common import PocketError
from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.interop import export
from pocketgpt.interop.export import export_hf, export_tiktoken
from pocketgpt.model import GPT, preset

TEXT_MIX = [
    "The quick brown fox jumps over the lazy dog. Don't stop; we'll see.",
    "你好，世界！小明有3个苹果，小红有12个。",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo:\n\tpass\n",
    "Emoji: 🙂🚀👍🏽 and ünïcödé, ¿qué?",
    "Digits 0 1 12 123 1234 3.14159 2024-01-31 +44 (0)20 7946 0958",
    "Spaces before punctuation stay : it 's , do n't . ok ?",
    "   leading spaces, trailing   \n\n\n\t\t mixed \r\n whitespace runs        end",
]

CONVERSATIONS = {
    "no_system": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    "system": [
        {"role": "system", "content": "You are terse.\nAnswer in one line."},
        {"role": "user", "content": "Name a colour 🙂"},
        {"role": "assistant", "content": " Blue  "},
        {"role": "user", "content": "Another, in 中文?"},
        {"role": "assistant", "content": "红色"},
        {"role": "user", "content": "Thanks\n\n"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris and 12*7?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"name": "calc", "arguments": {"expr": "12*7", "exact": True, "digits": [1, 2]}},
            # OpenAI's form, a JSON string, in another spacing than json.dumps's: written as it is by both
            {"function": {"name": "calc", "arguments": json.dumps({"expr": "84/2", "y": "é"}, ensure_ascii=False,
                                                                  separators=(",", ":"))}}]},
        {"role": "tool", "content": "84"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "21 °C; 84."},
        {"role": "user", "content": "ok"},
    ],
}


def _save_and_export(model, chat, root):
    save_model(model, root / "run" / "sft", chat, {"stage": "sft"})
    return export_hf(root / "run", root / "hf")  # a run directory: its sft stage is found


@pytest.fixture(scope="module")
def ours(tokenizer, chat, tmp_path_factory):
    """A small-shaped model with our tokenizer and template, exported. At the default init_std a random
    model repeats one token forever; larger weights make greedy decoding vary, so it tests positions."""
    torch.manual_seed(0)
    model = GPT(preset("small", vocab_size=tokenizer.vocab_size, init_std=0.2)).eval()
    return model, chat, _save_and_export(model, chat, tmp_path_factory.mktemp("ours"))


@pytest.fixture(scope="module")
def chatml(hf_tokenizer, hf_chat, tmp_path_factory):
    """A tiny model with a Hugging Face tokenizer and a ChatML template, exported."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=hf_tokenizer.vocab_size)).eval()
    return model, hf_chat, _save_and_export(model, hf_chat, tmp_path_factory.mktemp("chatml"))


@pytest.fixture(params=["ours", "chatml"])
def exported(request):
    return request.getfixturevalue(request.param)


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def _hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _chat_ids(hf_tok, messages, **kw) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list."""
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def test_files_and_special_ids(exported):
    model, chat, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    config = json.loads((folder / "config.json").read_text())
    gen = json.loads((folder / "generation_config.json").read_text())
    bos = chat.document_start[0] if chat.document_start else None
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (bos, chat.stop_ids[0], chat.pad_id)
    assert gen["eos_token_id"] == list(chat.stop_ids) and gen["pad_token_id"] == chat.pad_id


def test_stored_dtype_is_kept(tiny_model, chat, tmp_path):
    from safetensors import safe_open

    save_model(tiny_model.to(torch.bfloat16), tmp_path / "model", chat)
    folder = export_hf(tmp_path / "model", tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert _hf_model(folder).dtype == torch.bfloat16


def test_transformers_logits_and_greedy_generation_match(ours):
    model, chat, folder = ours
    hf = _hf_model(folder)
    # The head was stored once, as the embedding: transformers must have tied it again.
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert hf.generation_config.eos_token_id == list(chat.stop_ids)
    prompts = [chat.prompt(CONVERSATIONS["no_system"]), chat.prompt(CONVERSATIONS["tools"]),
               chat.document("Once upon a time")]
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)

    params = SamplingParams(max_tokens=20, temperature=0, stop_tokens=chat.stop_ids)
    completions = Engine(model, chat.tokenizer).generate(prompts, params)
    assert all(len(set(c.tokens)) > 10 for c in completions)
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            # generation_config.json's eos list stops transformers at the same ids our stop_tokens do.
            out = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False)[0, len(p):].tolist()
            assert out == c.tokens


@pytest.mark.parametrize("shape", [{"tie_embeddings": False}, {"attention_bias": True}], ids=["untied", "qwen2"])
def test_other_architectures_match(tokenizer, chat, tmp_path, shape):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.2, **shape)).eval()
    hf = _hf_model(_save_and_export(model, chat, tmp_path))
    x = torch.tensor([chat.prompt(CONVERSATIONS["system"])])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_tokenizer_gives_our_ids(exported):
    from conftest import small_corpus

    _, chat, folder = exported
    hf_tok, pocket = _hf_tokenizer(folder), chat.tokenizer
    for text in TEXT_MIX + small_corpus():
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == pocket.encode(text), text
        assert hf_tok.decode(ids) == text
    # transformers reads a special token's string in text as the special token, unless asked not to.
    text = "<|bos|> and <|im_start|> as plain text"
    assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == pocket.encode(text)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_renders_our_ids(exported, name):
    _, chat, folder = exported
    hf_tok, messages = _hf_tokenizer(folder), CONVERSATIONS[name]
    assert _chat_ids(hf_tok, messages) == chat.render(messages)[0]
    assert _chat_ids(hf_tok, messages, add_generation_prompt=True) == chat.prompt(messages)


def test_chatml_default_system_survives_jinja_quoting(chatml, hf_tokenizer):
    from pocketgpt.chat import ChatMLTemplate

    tricky = ChatMLTemplate(hf_tokenizer, default_system='Say "hi" \\ {{ x }} {% raw %}\n🙂\tend', eos="<|im_end|>")
    hf_tok = _hf_tokenizer(chatml[2])
    messages = CONVERSATIONS["no_system"]
    ids = _chat_ids(hf_tok, messages, chat_template=export.jinja_template(tricky), add_generation_prompt=True)
    assert ids == tricky.prompt(messages)


def test_peft_lora_trains_only_the_adapter(ours):
    from peft import LoraConfig, get_peft_model

    model, chat, folder = ours
    peft_model = get_peft_model(_hf_model(folder), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    ids = torch.tensor([chat.render(CONVERSATIONS["system"])[0]])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    adapter = {n for n in grads if "lora_" in n}
    assert len(adapter) == 2 * 2 * model.cfg.n_layer  # A and B, on q and v, in every layer
    assert all(grads[n] is not None for n in adapter)
    assert all(g is None for n, g in grads.items() if n not in adapter)
    assert any(grads[n].abs().sum() > 0 for n in adapter)


def test_tiktoken_file_encodes_like_ours(tokenizer, tmp_path, monkeypatch):
    import tiktoken
    import tiktoken.load
    from conftest import small_corpus

    from pocketgpt.tokenizer import BPETokenizer

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))

    def rebuild(path):
        meta = json.loads(open(f"{path}.json").read())
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=meta["sha256"])
        return tiktoken.Encoding(name="x", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                 special_tokens=meta["special_tokens"])

    path = export_tiktoken(tokenizer, tmp_path / "pocket.tiktoken")
    enc = rebuild(path)
    assert enc.n_vocab == tokenizer.vocab_size
    for text in TEXT_MIX + small_corpus():
        ids = enc.encode_ordinary(text)
        assert ids == tokenizer.encode(text)
        assert enc.decode(ids) == text
    assert enc.encode("<|bos|>hi", allowed_special="all")[0] == tokenizer.special("<|bos|>")

    # tiktoken caches a file by its path; the sidecar's hash makes it reread one exported again.
    other = BPETokenizer.train(["entirely different text " * 30], vocab_size=300)
    export_tiktoken(other, path)
    assert rebuild(path).encode_ordinary("different text") == other.encode("different text")


# ----------------------------------------------------------------------------- bad input


def test_refuses_non_empty_destination(tiny_model, chat, tmp_path):
    save_model(tiny_model, tmp_path / "model", chat)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PocketError, match="not empty"):
        export_hf(tmp_path / "model", tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(PocketError, match="not empty"):
        export_hf(tmp_path / "model", tmp_path / "file")
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert (export_hf(tmp_path / "model", tmp_path / "empty") / "model.safetensors").exists()


def test_a_tiktoken_export_never_replaces_the_users_files(tokenizer, tmp_path):
    """`export --to tiktoken notes` replaced notes and notes.json without a word (a model's tokenizer.json
    too); an earlier export at the same path is still replaced (the test above)."""
    for mine in ("notes", "tok.json"):  # the rank file, or the JSON beside it
        (tmp_path / mine).write_text("mine")
    for path, existing in (("notes", "notes"), ("tok", "tok.json")):
        with pytest.raises(PocketError, match=f"{existing} already exists and is not an earlier tiktoken export"):
            export_tiktoken(tokenizer, tmp_path / path)
    assert (tmp_path / "notes").read_text() == "mine" and (tmp_path / "tok.json").read_text() == "mine"
    assert not (tmp_path / "tok").exists() and not (tmp_path / "notes.json").exists()


def test_failure_leaves_nothing_behind(tiny_model, smeared_model, chat, tmp_path, monkeypatch):
    save_model(tiny_model, tmp_path / "model", chat)
    before = sorted(os.listdir(tmp_path))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tmp_path / "model", tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == before

    with pytest.raises(PocketError, match="does not exist"):
        export_hf(tmp_path / "nowhere", tmp_path / "hf")
    save_model(tiny_model.with_score_head(), tmp_path / "rm", chat)
    with pytest.raises(PocketError, match="export of reward models is not supported"):
        export_hf(tmp_path / "rm", tmp_path / "hf")
    save_model(smeared_model, tmp_path / "smeared", chat)
    with pytest.raises(PocketError, match="smears its keys"):
        export_hf(tmp_path / "smeared", tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["rm", "smeared"])


def test_an_export_imports_back_as_the_same_model(exported, tmp_path):
    """Our own format was refused on import ("not supported (no <|im_start|>/<|im_end|> tokens)"), with a
    message that claimed it was."""
    from pocketgpt.interop.importer import import_model

    model, chat, folder = exported
    import_model(folder, tmp_path / "back")
    back, back_chat, _ = load_model(tmp_path / "back")
    assert back_chat.spec() == chat.spec()
    for messages in CONVERSATIONS.values():
        assert back_chat.render(messages) == chat.render(messages)
        assert back_chat.prompt(messages) == chat.prompt(messages)
    ids = torch.tensor([chat.render(CONVERSATIONS["tools"])[0][:model.cfg.max_seq_len]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=1e-5, atol=1e-5)
