import json

import pytest
import torch

from pocketgpt.checkpoint import (
    latest_training_state,
    load_model,
    save_model,
    save_training_state,
    stored_params,
)
from pocketgpt.common import PocketError
from pocketgpt.model import GPT, preset
from pocketgpt.tokenizer import BPETokenizer


def test_save_load_round_trip(tiny_model, tokenizer, chat, tmp_path):
    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base"})
    model, loaded_chat, cfg = load_model(tmp_path)  # a run dir resolves to its best stage
    x = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(model(x), tiny_model(x))
    assert loaded_chat.tokenizer.fingerprint() == tokenizer.fingerprint() and cfg["meta"]["stage"] == "base"


def test_tied_head_is_stored_once(tiny_model, tokenizer, chat, tmp_path):
    from safetensors.torch import load_file

    save_model(tiny_model, tmp_path, chat)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")


def test_corrupt_weights_are_detected(tiny_model, tokenizer, chat, tmp_path):
    save_model(tiny_model, tmp_path, chat)
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PocketError, match="do not match the hash"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["weights_sha256"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PocketError, match="not a valid safetensors"):
        load_model(tmp_path)


def test_shape_mismatch_says_what_differs(tiny_model, tokenizer, chat, tmp_path):
    save_model(tiny_model, tmp_path, chat)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["d_model"] = 128
    cfg["model"]["d_ff"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PocketError, match=r"model.embed_tokens.weight: checkpoint has \(512, 64\), config expects \(512, 128\)"):
        load_model(tmp_path)


def _edit_json(path, edit):
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(edit(obj)))


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").unlink(), r"model.safetensors is missing"),
    (lambda d: _edit_json(d / "config.json", lambda c: {**c, "model": {**c["model"], "n_layer": "six"}}),
     r"config.json: model config n_layer must be int, got 'six'"),
    (lambda d: _edit_json(d / "config.json", lambda c: {k: v for k, v in c.items() if k != "model"}),
     r"config.json: no model table"),
    (lambda d: _edit_json(d / "config.json", lambda c: [1, 2]), r"unknown checkpoint format 'list'"),
    (lambda d: _edit_json(d / "tokenizer.json", lambda t: {**t, "pattern": "(["}),
     r"tokenizer.json: not a valid tokenizer file \(ValueError"),
    (lambda d: _edit_json(d / "tokenizer.json", lambda t: {k: v for k, v in t.items() if k != "ranks"}),
     r"tokenizer.json: not a valid tokenizer file \(KeyError"),
])
def test_a_damaged_model_directory_says_what_is_wrong(tiny_model, chat, tmp_path, damage, message):
    """What a hand edit or a half copy leaves: one PocketError naming the file (tracebacks before)."""
    save_model(tiny_model, tmp_path, chat)
    damage(tmp_path)
    with pytest.raises(PocketError, match=message):
        load_model(tmp_path)


def test_tokenizer_mismatch(tiny_model, tokenizer, chat, tmp_path):
    save_model(tiny_model, tmp_path, chat)
    BPETokenizer.train(["something else entirely " * 50], vocab_size=300).save(tmp_path / "tokenizer.json")
    with pytest.raises(PocketError, match="tokenizer differs"):
        load_model(tmp_path)


def test_missing_and_half_written(tmp_path, tiny_model):
    with pytest.raises(PocketError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(PocketError, match="holds no model"):
        load_model(tmp_path)
    # a training checkpoint directory only appears, under its final name, once complete
    opt = torch.optim.AdamW(tiny_model.parameters())
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp_abc").mkdir()  # what a crash mid-write leaves behind
    assert latest_training_state(tmp_path) is None
    save_training_state(tmp_path, 5, tiny_model, opt, {"objective": {}})
    assert latest_training_state(tmp_path).name == "step_0000005"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000005"]  # the leftover is cleared


def test_keeps_only_recent_training_states(tmp_path):
    model = GPT(preset("tiny", vocab_size=300))
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3, 4):
        save_training_state(tmp_path, step, model, opt, {"objective": {}}, keep=2)
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step_*"))] == ["step_0000003", "step_0000004"]


def test_resuming_needs_only_the_newest_state_and_a_finished_model_none(tiny_model, chat, tmp_path):
    opt = torch.optim.AdamW(tiny_model.parameters())
    for step in (5, 10):
        save_training_state(tmp_path, step, tiny_model, opt, {"objective": {}})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000010"]
    save_model(tiny_model, tmp_path, chat)  # a model written by an interrupted stage: its state stays to resume
    assert latest_training_state(tmp_path).name == "step_0000010"
    # The last state of a finished run outlives the run (a kill before the model is written resumes from
    # it, saved again at the same step), and goes once the model that replaces it is written.
    for _ in range(2):
        save_training_state(tmp_path, 12, tiny_model, opt, {"objective": {}, "replaced_by_model": True})
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000012"]
    assert json.loads((tmp_path / "checkpoints" / "step_0000012" / "state.json").read_text())["step"] == 12
    save_model(tiny_model, tmp_path, chat)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_stored_params_counts_the_weights_on_disk(tiny_model, chat, tmp_path):
    save_model(tiny_model, tmp_path / "sft", chat)
    save_model(tiny_model.with_score_head(), tmp_path / "rm", chat)
    assert stored_params(tmp_path / "sft") == tiny_model.num_params()  # the tied head counted once
    assert stored_params(tmp_path / "rm") == tiny_model.num_params() + tiny_model.cfg.d_model  # + the score head
    with pytest.raises(PocketError, match="not a valid safetensors"):
        stored_params(tmp_path)


def test_a_run_made_before_chat_templates_still_loads(tiny_model, chat, tmp_path):
    """config.json as the previous version wrote it: no chat template, no head_dim/bias/RoPE-scaling fields."""
    save_model(tiny_model, tmp_path / "sft", chat, {"stage": "sft"})
    path = tmp_path / "sft" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["chat_template"]
    for key in ("head_dim", "rope_scaling", "attention_bias"):
        del cfg["model"][key]
    path.write_text(json.dumps(cfg))
    model, loaded, _ = load_model(tmp_path)
    assert loaded.name == "pocketgpt" and model.cfg.head_dim == tiny_model.cfg.head_dim
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.prompt(messages) == chat.prompt(messages)
    ids = torch.tensor([chat.prompt(messages)])
    assert torch.equal(model(ids), tiny_model(ids))
