"""`pocketgpt chat`: the terminal conversation, driven with scripted input."""

import functools
import io
import json
from types import SimpleNamespace

import torch
from test_toolloop import Script, call_turn

from pocketgpt import chat_cli
from pocketgpt.chat_cli import chat_loop
from pocketgpt.checkpoint import save_model
from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.model import GPT, preset


def test_chat_keeps_the_conversation_until_reset(tmp_path, chat, monkeypatch, capsys):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size))
    save_model(model, tmp_path / "sft", chat, {"stage": "sft"})
    prompts = []
    real_submit = Engine.submit

    def recording_submit(self, prompt, params, *args, **kwargs):
        prompts.append((prompt, params.temperature))
        return real_submit(self, prompt, params, *args, **kwargs)

    monkeypatch.setattr(Engine, "submit", recording_submit)
    # "/temp -1" is refused where it is typed (taken, it ended the session at the next message)
    lines = iter(["hello", "/temp 0", "/temp -1", "again", "/system be brief", "/reset", "fresh", "/bogus", "/quit", "never read"])
    out = io.StringIO()
    args = SimpleNamespace(model=str(tmp_path), system=None, temperature=0.7, max_tokens=8, device="cpu", threads=1)
    chat_loop(args, read=lambda _: next(lines), out=out)

    assert len(prompts) == 3 and [t for _, t in prompts] == [0.7, 0.0, 0.0]
    engine = Engine(model.eval(), chat.tokenizer)
    greedy = [engine.generate([p], SamplingParams(max_tokens=8, temperature=0, stop_tokens=chat.stop_ids))[0].text
              for p, _ in prompts[1:]]
    # The output is the three replies, each ended by a newline (a sampled reply may hold newlines too).
    text = out.getvalue()
    after_first = "\n" + greedy[0] + "\n" + greedy[1] + "\n"
    assert text.endswith(after_first)
    first_reply = text[:-len(after_first)]
    second = chat.prompt([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first_reply},
                          {"role": "user", "content": "again"}])
    assert prompts[1][0] == second  # the first exchange is part of the second prompt
    fresh = chat.prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "fresh"}])
    assert prompts[2][0] == fresh  # /reset forgot it; /system applies to what follows
    # a random model never ends its turn: each reply is cut at --max-tokens, which is said (it was silent)
    assert capsys.readouterr().err.count("(cut short at 8 tokens: --max-tokens)") == 3


def test_a_tool_call_is_run_shown_and_kept_in_the_conversation(tmp_path, chat, tokenizer, monkeypatch, capsys):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size))
    save_model(model, tmp_path / "sft", chat, {"stage": "sft"})
    end = tokenizer.special_ids["<|assistant_end|>"]
    script = Script([call_turn(chat, "123*45"), [*tokenizer.encode("It is 5535."), end],
                     [*tokenizer.encode("You are welcome."), end]])
    monkeypatch.setattr(chat_cli, "stream_with_tools", functools.partial(chat_cli.stream_with_tools, processors=[script]))
    prompts = []
    real_submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, prompt, *a, **k: prompts.append(prompt) or real_submit(self, prompt, *a, **k))
    lines = iter(["What is 123 * 45?", "thanks", "/quit"])
    out = io.StringIO()
    args = SimpleNamespace(model=str(tmp_path), system=None, temperature=0.0, max_tokens=64, device="cpu", threads=1)
    chat_loop(args, read=lambda _: next(lines), out=out)

    assert out.getvalue().split("\n")[:2] == ["It is 5535.", "You are welcome."]  # the call's JSON is not printed
    assert 'calculator({"expression": "123*45"}) -> 5535' in capsys.readouterr().err
    call = {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": "123*45"})}}
    assert prompts[1] == chat.prompt([{"role": "user", "content": "What is 123 * 45?"},
                                      {"role": "assistant", "content": "", "tool_calls": [call]},
                                      {"role": "tool", "content": "5535"},
                                      {"role": "assistant", "content": "It is 5535."},
                                      {"role": "user", "content": "thanks"}])
