"""`pocketgpt serve`, started as a user starts it, driven by the official `openai` client: a tiny run
of ours and the imported SmolLM2. Then every validation rule: the right 4xx, in OpenAI's shape."""

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from pocketgpt.checkpoint import save_model
from pocketgpt.common import PocketError
from pocketgpt.model import GPT, preset
from pocketgpt.serve.api import by_sequence, drain

openai = pytest.importorskip("openai")

KEY = "test-key"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "unit": {"enum": ["m", "kg", "s"]}},
          "required": ["answer", "unit"], "additionalProperties": False}
CALCULATOR = {"type": "function", "function": {"name": "calculator", "description": "exact arithmetic",
                                               "parameters": {"type": "object", "properties": {
                                                   "expression": {"type": "string", "maxLength": 12}},
                                                   "required": ["expression"], "additionalProperties": False}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run, *extra, compile: bool = False) -> tuple[subprocess.Popen, str]:
    """`pocketgpt serve` on a free port; without `compile` (most tests need no fast decoding, and compiling
    would dominate their time)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pocketgpt.cli", "serve", str(run), "--port", str(port),
                             "--api-key", KEY, "--threads", "1", "--compile" if compile else "--no-compile", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    limit = 300 if compile else 60
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not start within {limit} s")


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def server(request, tmp_path_factory, chat, smollm2_gguf):
    run = tmp_path_factory.mktemp("serve") / "run"
    if request.param == "tiny":
        torch.manual_seed(0)
        save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size)), run / "base", chat, {"stage": "base"})
        torch.manual_seed(1)
        save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size)), run / "sft", chat, {"stage": "sft"})
        model = "sft"
    else:
        from pocketgpt.interop.importer import import_model

        import_model(smollm2_gguf, run)
        model = "base"
    # The tiny run is served as users serve by default, with the compiled decode step (the imported
    # model's compile takes minutes, too long for a test).
    proc, url = start_server(run, compile=request.param == "tiny")
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120), url, model, request.param
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_models(server):
    client, _, model, kind = server
    ids = [m.id for m in client.models.list().data]
    assert model in ids and (ids == ["base", "sft"] if kind == "tiny" else ids == ["base"])
    assert client.models.retrieve(model).id == model  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_chat_non_streaming_and_n(server):
    client, _, model, kind = server
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if kind == "smollm2":
        assert "Paris" in r.choices[0].message.content
    two = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say something."}],
                                         max_tokens=8, temperature=1.0, n=2, seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]


def test_ignore_eos_decodes_to_max_tokens(server):
    """vLLM's and llama.cpp's benchmark extension: the reply goes on past the end of its turn."""
    client, _, model, kind = server
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    if kind == "smollm2":  # it answers in a few words and stops, unless told to ignore the end of its turn
        short = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
        assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40


def test_a_prefilled_reply_is_continued(server):
    """vLLM's continue_final_message: the model goes on from the reply so far; greedy, the continuation
    of the head of a reply is the rest of that reply. (Held to words: the tiny model's raw reply writes
    special tokens, which a prefilled reply would take as the plain text they are.)"""
    client, url, model, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}

    def tokens(text: str) -> list[int]:
        return httpx.post(url + "/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False},
                          headers=auth).json()["tokens"]

    def text_of(ids: list[int]) -> str:
        return httpx.post(url + "/detokenize", json={"model": model, "tokens": ids}, headers=auth).json()["prompt"]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    words = {"guided_regex": "[A-Za-z ,.]+"}
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                           extra_body=words)
    text = whole.choices[0].message.content
    ids = tokens(text)
    # the longest head of the reply (at most half of it) that is the same tokens on its own as in the reply
    head = next(text_of(ids[:k]) for k in range(len(ids) // 2, 0, -1) if tokens(text_of(ids[:k])) == ids[:k])
    rest = client.chat.completions.create(
        model=model, messages=messages + [{"role": "assistant", "content": head}], temperature=0, max_tokens=12,
        extra_body={**words, "continue_final_message": True, "add_generation_prompt": False})
    assert (head + rest.choices[0].message.content)[:len(text)] == text
    assert rest.usage.prompt_tokens == whole.usage.prompt_tokens + len(tokens(head))


def test_chat_streaming_with_usage(server):
    client, _, model, _ = server
    messages = [{"role": "user", "content": "Count to five."}]
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert text == whole.choices[0].message.content  # greedy: streaming writes the same reply


def test_logprobs(server):
    client, _, model, _ = server
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:  # greedy: the chosen token is the most likely one
        assert t.logprob <= 0 and abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4


def test_json_schema_output_always_validates(server):
    client, _, model, _ = server
    fmt = {"type": "json_schema", "json_schema": {"name": "measure", "schema": SCHEMA, "strict": True}}
    outputs = []
    for seed in range(7):  # 7 x n=8 > 50 samples at temperature 1
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "How far? Answer in JSON."}],
                                           max_tokens=40, temperature=1.0, n=8, seed=seed, response_format=fmt)
        outputs += [c.message.content for c in r.choices]
    assert len(outputs) >= 50
    for text in outputs:
        obj = json.loads(text)
        assert set(obj) == {"answer", "unit"} and isinstance(obj["answer"], int) and 0 <= obj["answer"] <= 999
        assert obj["unit"] in ("m", "kg", "s")


def test_guided_json_output_validates(server):
    """vLLM's guided_json, as an object and as a JSON string: the same constraint as a json_schema format."""
    client, _, model, _ = server
    for schema in (SCHEMA, json.dumps(SCHEMA)):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "How far? In JSON."}],
                                           max_tokens=40, temperature=1.0, n=4, seed=1, extra_body={"guided_json": schema})
        for c in r.choices:
            obj = json.loads(c.message.content)
            assert set(obj) == {"answer", "unit"} and obj["unit"] in ("m", "kg", "s")


def test_logit_bias_and_penalties(server):
    """OpenAI's logit_bias forces (+100) a token, also at temperature 0 (the engine's tests ban with -100); the
    presence and frequency penalties change a greedy reply that repeats itself."""
    client, url, model, _ = server
    messages = [{"role": "user", "content": "Write the word yes ten times."}]

    def reply(max_tokens=12, **settings):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                           logprobs=True, **settings)
        return r.choices[0].message.content, [t.token for t in r.choices[0].logprobs.content]

    def call(path: str, body: dict) -> dict:
        return httpx.post(url + path, json={"model": model, **body}, headers={"Authorization": f"Bearer {KEY}"}).json()

    free, pieces = reply()
    assert len(set(pieces)) < len(pieces)  # the greedy reply repeats a token: what the penalties must change
    forced = call("/tokenize", {"prompt": " yes"})["tokens"][-1]
    piece = call("/detokenize", {"tokens": [forced]})["prompt"]
    assert reply(logit_bias={str(forced): 100}, max_tokens=3)[0] == piece * 3
    assert reply(presence_penalty=2.0, frequency_penalty=2.0)[0] != free
    completion = client.completions.create(model=model, prompt="The", max_tokens=3, temperature=0,
                                           logit_bias={str(forced): 100})
    assert completion.choices[0].text == piece * 3


def test_tool_call_round_trip(server):
    client, _, model, _ = server
    messages = [{"role": "user", "content": "What is 12 * 34? Use the calculator."}]
    r = client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR], max_tokens=100, seed=0,
                                       tool_choice={"type": "function", "function": {"name": "calculator"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "calculator" and isinstance(json.loads(call.function.arguments)["expression"], str)
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "408"}]
    again = client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR], tool_choice="none",
                                           max_tokens=10, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length") and not again.choices[0].message.tool_calls


def test_completions(server):
    client, _, model, _ = server
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=2)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert len(r.choices[0].logprobs.tokens) == len(r.choices[0].logprobs.token_logprobs) >= 1


def test_a_completions_prompt_in_each_of_openais_forms(server):
    _, url, model, _ = server

    def complete(prompt):
        return httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4,
                                                          "temperature": 0}, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60)

    ids = httpx.post(url + "/tokenize", json={"model": model, "prompt": "The capital of France is"},
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()["tokens"]
    replies = [complete(p) for p in ("The capital of France is", ["The capital of France is"], ids, [ids])]
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    assert len({r.json()["choices"][0]["text"] for r in replies}) == 1  # the same prompt, however it is sent
    for bad in ([ids, ids], ["a", "b"]):
        r = complete(bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "one prompt per request, and this one holds 2" in r.json()["error"]["message"]
    # a value no form takes is named where it goes wrong, not as "prompt: not a string"
    for bad, param in (([[1, "a"]], "prompt.0.1"), ([{"a": 1}], "prompt.0"), ([[-1]], "prompt")):
        r = complete(bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_a_repeated_beginning_comes_from_the_prefix_cache(server):
    """The second request with the same system prompt reports the reused tokens as cached_tokens (vLLM's
    usage field) and greedy decoding answers as it did when the whole prompt was prefilled."""
    client, url, model, _ = server
    system = {"role": "system", "content": "You answer questions about geography briefly and politely, in one "
                                           "sentence, and you say so when you do not know the answer."}
    ask = lambda question: client.chat.completions.create(  # noqa: E731
        model=model, messages=[system, {"role": "user", "content": question}], max_tokens=6, temperature=0)
    first, second, again = ask("What is the capital of Peru?"), ask("Where is Mali?"), ask("What is the capital of Peru?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens_details.cached_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    rate = next(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
                if line.startswith(f'pocketgpt_prefix_cache_hit_rate{{model="{model}"}}'))
    assert 0 < rate < 1


def test_tokenize_detokenize_metrics(server):
    _, url, model, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "Hello <|im_start|> world"
    out = httpx.post(url + "/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False},
                     headers=auth).json()
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) and not any(out["special"])
    # by default a prompt is counted as /v1/completions reads it (our models' <|bos|> first: one short before)
    counted = httpx.post(url + "/tokenize", json={"model": model, "prompt": text}, headers=auth).json()["count"]
    used = httpx.post(url + "/v1/completions", json={"model": model, "prompt": text, "max_tokens": 1},
                      headers=auth, timeout=60).json()["usage"]["prompt_tokens"]
    assert counted == used
    assert httpx.post(url + "/detokenize", json={"model": model, "tokens": out["tokens"]},
                      headers=auth).json()["prompt"] == "Hello <|im_start|> world"
    metrics = httpx.get(url + "/metrics").text
    assert f'pocketgpt_requests_running{{model="{model}"}}' in metrics
    assert "pocketgpt_time_to_first_token_seconds" in metrics and "pocketgpt_generated_tokens_total" in metrics


BAD_REQUESTS = [
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [CALCULATOR],
      "tool_choice": {"type": "function", "function": {"name": "search"}}}, 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [CALCULATOR] * 129}, 400, "tools"),
    # 4 stop strings of 100,000 characters stalled the whole server for 10 s (each streamed token checked them)
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["x" * 1001]}, 400, "stop"),
    # a tool whose parameters are no schema, offered without forcing a call: it was accepted
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
     400, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_choice": []}, 400, "guided_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_choice": ["yes", ""]}, 400, "guided_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_choice": ["x"] * 300}, 400, "guided_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_choice": ["yes"], "response_format": {"type": "json_object"}},
     400, "guided_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_regex": ""}, 400, "guided_regex"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_regex": "[0-9"}, 400, "guided_regex"),
    # a pattern no text matches: it answered "" with 200
    ({"messages": [{"role": "user", "content": "x"}], "guided_regex": "[^\\x00-\\U0010FFFF]"}, 400, "guided_regex"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_regex": "[0-9]+", "guided_choice": ["1"]}, 400,
     "guided_regex"),
    ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True, "add_generation_prompt": False},
     400, "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True}, 400,
     "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False}, 400, "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "max_tokens"),
    # the field the request set, not max_tokens
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    # an AttributeError, a 500
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": "f"}}, 400, "tool_choice"),
    # constraints that do not compile name the field that asked for them (param null before)
    ({"messages": [{"role": "user", "content": "x"}], "guided_json": {"type": "nonsense"}}, 400, "guided_json"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, 400, "tools"),
    # a tool call without a function's name: it was rendered as {"name": null}
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "tool_calls": [{"bogus": 1}]},
                   {"role": "user", "content": "yo"}]}, 400, None),
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}] * 600}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"comma": 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"\u00b2": 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"9" * 5000: 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 250}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {str(i): 1 for i in range(2000)}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, 400, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    # what other servers take and this one does not do: refused, not ignored
    ({"messages": [{"role": "user", "content": "x"}], "min_p": 0.1}, 400, "min_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, 400, "max_tokens"),  # OpenAI's too
    ({"messages": [{"role": "user", "content": "x"}], "stream": 1}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1.3}, 400, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_json": "{not json"}, 400, "guided_json"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_json": [1, 2]}, 400, "guided_json"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_json": SCHEMA, "guided_regex": "[0-9]+"}, 400,
     "guided_json"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_in_openai_shape(server, body, status, param):
    _, url, model, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, **body},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param


@pytest.mark.parametrize("body,param", [({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"),
                                        ({"guided_regex": "[0-9]+"}, "guided_regex"), ({"min_tokens": 4}, "min_tokens"),
                                        ({"logit_bias": {"1": -101}}, "logit_bias")])
def test_completions_refuse_what_they_do_not_do(server, body, param):
    _, url, model, _ = server
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "The", **body},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    neutral = {"model": model, "prompt": "The", "max_tokens": 2, "best_of": 1, "suffix": None, "user": "u", "min_p": 0}
    assert httpx.post(url + "/v1/completions", json=neutral, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60).status_code == 200  # the settings that change nothing, and unknown fields


def test_json_nested_thousands_deep_in_a_string_field_is_a_400(server):
    """Python's json parser raises RecursionError, not a ValueError, on brackets nested thousands deep: tool-call
    arguments and guided_json (JSON inside a string) answered 500."""
    _, url, model, _ = server
    deep = "[" * 100_000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    for extra in ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]},
                  {"messages": [{"role": "user", "content": "hi"}], "guided_json": deep}):
        r = httpx.post(url + "/v1/chat/completions", json={"model": model, "max_tokens": 2, **extra},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_malformed_json_unknown_model_and_bad_key(server):
    _, url, model, _ = server
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] is None  # not the character offset where the JSON broke
    r = httpx.put(url + "/v1/chat/completions", json={}, headers=auth)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
                   headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/nope").status_code == 404
    assert httpx.get(url + "/health").status_code == 200  # liveness needs no key


def test_text_that_is_not_unicode_is_a_400(server):
    """JSON's \\ud800 escape decodes to a lone surrogate, which no tokenizer takes: a 500 before."""
    _, url, model, _ = server
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for path, body, param in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content"),
            ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
            ("/tokenize", {"prompt": "\ud800"}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "guided_choice": ["\ud800"]},
             "guided_choice.0")):
        r = httpx.post(url + path, content=json.dumps({"model": model, **body}), headers=auth, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
        assert "not Unicode text" in r.json()["error"]["message"]


def test_requests_that_name_their_fields_wrongly_or_not_at_all(server):
    _, url, model, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x " * 10_000}, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text  # it said "messages"
    r = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60)
    assert r.status_code == 400 and "no body" in r.json()["error"]["message"], r.text  # "Field required"
    r = httpx.post(url + "/tokenize", json={"model": model}, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text  # 200, no tokens
    r = httpx.post(url + "/tokenize", json={"model": model, "prompt": "x" * 200_000}, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text  # no limit


def test_streamed_completions_give_logprobs_and_usage_as_unstreamed_ones_do(server):
    """`stream: true` on /v1/completions sent logprobs null and no usage; chat with tools, no logprobs."""
    _, url, model, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 5, "logprobs": 2, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60).json()
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True, "stream_options": {
            "include_usage": True}}, headers=auth, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    expected = whole["choices"][0]["logprobs"]
    assert [t for lp in streamed for t in lp["tokens"]] == expected["tokens"]
    assert [t for lp in streamed for t in lp["token_logprobs"]] == pytest.approx(expected["token_logprobs"])
    assert [t for lp in streamed for t in lp["text_offset"]] == expected["text_offset"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    chat = {"model": model, "messages": [{"role": "user", "content": "Say hi"}], "tools": tools, "logprobs": True,
            "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat, headers=auth, timeout=60) as r:
        entries = [e for line in r.iter_lines() if line.startswith("data: {")
                   for choice in json.loads(line[6:])["choices"] if choice["logprobs"]
                   for e in choice["logprobs"]["content"]]
    assert len(entries) >= 1


def test_a_client_that_goes_away_frees_its_rows(server):
    _, url, model, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000,
            "stream": True, "temperature": 1.0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # hang up mid-stream
    assert rows_freed(url, model)
    # a client waiting for a whole reply that hangs up: it decoded on to max_tokens (SmolLM2: a minute), as
    # tokens kept coming (the tiny model may finish its reply before the client gives up)
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "ignore_eos": True}, headers=auth,
                   timeout=2)
    assert rows_freed(url, model)


def rows_freed(url: str, model: str) -> bool:
    """Whether the server's running batch is empty within 10 s."""
    for _ in range(100):
        metrics = httpx.get(url + "/metrics").text
        running = next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith(f'pocketgpt_requests_running{{model="{model}"}}'))
        if running == "0":
            return True
        time.sleep(0.1)
    return False


def fuzzed_bodies():
    """Request bodies with every field the API knows, each with plausible or absurd values."""
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
    anything = st.recursive(scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                            max_leaves=10)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]),
         "content": st.one_of(st.text(max_size=30), st.none(), anything,
                              st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                              "text": st.text(max_size=10)}), max_size=2))},
        optional={"tool_calls": st.one_of(anything, st.lists(st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries(
                {"name": st.text(max_size=8), "arguments": st.one_of(st.text(max_size=20), anything)})}), max_size=2))})
    fields = {
        "messages": st.lists(message, max_size=3), "max_tokens": st.one_of(st.integers(-5, 64), anything),
        "temperature": st.one_of(st.floats(-1, 3), anything), "top_p": st.one_of(st.floats(-1, 2), anything),
        "top_k": st.integers(-3, 100000), "n": st.one_of(st.integers(-2, 10), anything),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=6), anything),
        "seed": st.one_of(st.integers(-2**70, 2**70), anything), "stream": st.booleans(),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
        "logprobs": st.one_of(st.booleans(), st.integers(-3, 30), anything),
        "top_logprobs": st.one_of(st.integers(-3, 30), anything),
        "response_format": st.one_of(anything, st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema"]),
             "json_schema": st.fixed_dictionaries({"name": st.text(max_size=4), "schema": anything})})),
        "tools": st.one_of(anything, st.lists(st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries(
                {"name": st.text(max_size=6), "parameters": anything})}), max_size=2)),
        "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", "x"]), anything),
        "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 600), max_size=5), anything),
        "tokens": st.lists(st.integers(-5, 10**6), max_size=4), "max_completion_tokens": st.integers(-5, 64),
        "logit_bias": st.one_of(anything, st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 10**6).map(str)),
                                                          st.one_of(st.floats(-200, 200), anything), max_size=3)),
        "presence_penalty": st.one_of(st.floats(-3, 3), anything), "frequency_penalty": st.one_of(st.floats(-3, 3), anything),
        "guided_json": st.one_of(anything, st.text(max_size=20)), "best_of": st.one_of(st.integers(-1, 3), anything),
        "min_p": st.one_of(st.floats(-1, 1), anything),
        "model_a": st.sampled_from(["sft", "ppo", "nope", 3]), "model_b": st.sampled_from(["sft", "ppo", None]),
        "winner": st.sampled_from(["a", "b", "tie", "both_bad", "c", 1]), "length_a": st.integers(-3, 10**6)}
    return st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
                                      "/arena/votes"]),
                     st.fixed_dictionaries({"model": st.sampled_from(["sft", "nope"])}, optional=fields))


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, chat):
    """A tiny run is enough to fuzz the protocol; SmolLM2 would only make it slower."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    torch.manual_seed(0)
    save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size)), run / "sft", chat, {"stage": "sft"})
    save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size)), run / "ppo", chat, {"stage": "ppo"})
    proc, url = start_server(run, "--arena-db", str(run / "votes.db"))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_no_request_gets_a_5xx(tiny_server):
    """Property: whatever the body, the answer is a 2xx or a 4xx in OpenAI's shape (the server lives on)."""
    from hypothesis import HealthCheck, given, settings

    url = tiny_server
    client = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"})

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=fuzzed_bodies())
    def check(case):
        path, body = case
        r = client.post(url + path, json=body)
        assert r.status_code < 500, (path, body, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert httpx.get(url + "/health").status_code == 200


def test_arena_votes_are_validated_and_rated(tiny_server):
    client = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    url = tiny_server + "/arena/votes"
    for body, param in [({"model_a": "sft", "model_b": "nope", "winner": "a"}, "model_b"),
                        ({"model_a": "sft", "model_b": "sft", "winner": "a"}, "model_b"),
                        ({"model_a": "sft", "model_b": "ppo", "winner": "left"}, "winner"),
                        ({"model_a": "sft", "model_b": "ppo", "winner": "a", "prompt": "x" * 10**6}, "prompt")]:
        r = client.post(url, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(url, json={"model_a": "sft", "model_b": "ppo", "winner": "a"}).status_code == 401
    before = client.get(tiny_server + "/arena/leaderboard").json()["votes"]
    assert client.post(url, json={"model_a": "sft", "model_b": "ppo", "winner": "b", "length_a": 3}).status_code == 200
    board = client.get(tiny_server + "/arena/leaderboard").json()
    assert board["votes"] == before + 1 and {r["model"] for r in board["rows"]} == {"sft", "ppo"}


def test_a_server_without_a_vote_file_says_so():
    from fastapi.testclient import TestClient

    from pocketgpt.serve.api import create_app

    r = TestClient(create_app({})).get("/arena/leaderboard")
    assert r.status_code == 404 and "--arena-db" in r.json()["error"]["message"]


def test_events_waiting_for_a_stream_leave_as_one_chunk_per_sample():
    """A stream that fell behind the engine takes everything waiting at once, grouped per sample in order
    of arrival: one chunk per sample instead of one per token."""
    class Seq:
        def __init__(self, id):
            self.id = id

    a, b = Seq(1), Seq(2)

    async def go():
        queue = asyncio.Queue()
        for item in [(a, "a1"), (b, "b1"), (a, "a2")]:
            queue.put_nowait(item)
        first = await drain(queue)
        queue.put_nowait((b, "b2"))
        return first, await drain(queue)

    first, second = asyncio.run(go())
    assert by_sequence(first) == [(a, ["a1", "a2"]), (b, ["b1"])]
    assert by_sequence(second) == [(b, ["b2"])]


def test_a_stage_trained_under_its_own_name_is_served_and_listed(tmp_path, tiny_model, chat, capsys):
    """`sft --name sft_lora` made a stage that `serve RUN` and `info RUN` left out (info counted its bytes)."""
    from pocketgpt.cli import main
    from pocketgpt.serve.api import load_workers

    for stage in ("sft", "sft_lora"):
        save_model(tiny_model, tmp_path / stage, chat, {"stage": "sft"})
    (tmp_path / "plots").mkdir()  # a run's own folder is no stage
    assert list(load_workers(tmp_path)) == ["sft", "sft_lora"]
    assert main(["info", str(tmp_path)]) == 0
    assert "sft_lora" in capsys.readouterr().out


def test_a_damaged_stage_is_left_out_and_the_others_served(tmp_path, tiny_model, chat, capsys):
    """One stage's damaged weights kept every stage of the run from being served."""
    from pocketgpt.serve.api import load_workers

    for stage in ("sft", "ppo"):
        save_model(tiny_model, tmp_path / stage, chat, {"stage": stage})
    weights = tmp_path / "ppo" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert list(load_workers(tmp_path)) == ["sft"]
    assert "not serving ppo: " in capsys.readouterr().err
    with pytest.raises(PocketError, match="model.safetensors"):  # a model directory alone: its own error
        load_workers(tmp_path / "ppo")
    (tmp_path / "sft" / "model.safetensors").write_bytes(b"")
    with pytest.raises(PocketError, match=r"none of its stages \(.*\) can be served"):
        load_workers(tmp_path)


def test_a_stopped_server_ends_its_replies_and_logs_no_hung_up_client(tmp_path, chat):
    """SIGTERM with streams open: clients got nothing for ~10 s, then a cut connection (no finish_reason, no
    [DONE]). And every non-streaming client that hung up was logged as "Exception in ASGI application"."""
    import signal
    import threading

    torch.manual_seed(0)
    save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size, max_seq_len=8192)), tmp_path / "run" / "sft",
               chat, {"stage": "sft"})
    proc, url = start_server(tmp_path / "run")
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "sft", "messages": [{"role": "user", "content": "Write forever."}], "max_tokens": 4000,
            "ignore_eos": True}
    try:
        with contextlib.suppress(httpx.TimeoutException):  # a client that hangs up on a whole reply
            httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=1)
        assert rows_freed(url, "sft")
        lines, streaming = [], threading.Event()

        def read_stream():
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=auth,
                              timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    streaming.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert streaming.wait(60)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert not reader.is_alive()
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        assert finishes[-1] == "error" and lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        assert proc.wait(timeout=30) == 0
        assert "Exception in ASGI application" not in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
