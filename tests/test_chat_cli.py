"""`pocketgpt chat`: the terminal conversation, driven with scripted input."""

import io
from types import SimpleNamespace

import torch

from pocketgpt.chat_cli import chat_loop
from pocketgpt.checkpoint import save_model
from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.model import GPT, preset


def test_chat_keeps_the_conversation_until_reset(tmp_path, chat, monkeypatch):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size))
    save_model(model, tmp_path / "sft", chat, {"stage": "sft"})
    prompts = []
    real_stream = Engine.stream

    def recording_stream(self, prompt, params):
        prompts.append((prompt, params.temperature))
        return real_stream(self, prompt, params)

    monkeypatch.setattr(Engine, "stream", recording_stream)
    lines = iter(["hello", "/temp 0", "again", "/system be brief", "/reset", "fresh", "/bogus", "/quit", "never read"])
    out = io.StringIO()
    args = SimpleNamespace(model=str(tmp_path), system=None, temperature=0.7, max_tokens=8, device="cpu", threads=1)
    chat_loop(args, read=lambda _: next(lines), out=out)

    assert len(prompts) == 3 and [t for _, t in prompts] == [0.7, 0.0, 0.0]
    first_reply = out.getvalue().split("\n")[0]
    second = chat.prompt([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first_reply},
                          {"role": "user", "content": "again"}])
    assert prompts[1][0] == second  # the first exchange is part of the second prompt
    fresh = chat.prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "fresh"}])
    assert prompts[2][0] == fresh  # /reset forgot it; /system applies to what follows
    greedy = Engine(model.eval(), chat.tokenizer).generate(
        [second], SamplingParams(max_tokens=8, temperature=0, stop_tokens=chat.stop_ids))[0].text
    assert out.getvalue().split("\n")[1] == greedy
