"""The LM protocol: the same calls, the same answers, through our engine and through our server."""

import json
import re

import pytest
import torch
from test_serve import KEY, start_server

from pocketgpt.checkpoint import save_model
from pocketgpt.model import GPT, preset
from pocketgpt.prefix_cache import BLOCK
from pocketgpt.reason import LM, Request


@pytest.fixture(scope="module")
def run(tmp_path_factory, chat):
    path = tmp_path_factory.mktemp("lm") / "run"
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size, max_seq_len=1024))  # room for worked examples
    save_model(model, path / "sft", chat, {"stage": "sft"})
    return path


@pytest.fixture(scope="module")
def served(run):
    proc, url = start_server(run)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module", params=["local", "openai"])
def lm(request, run, served):
    return LM.load(run, device="cpu") if request.param == "local" else LM.openai(served + "/v1", api_key=KEY)


HELLO = [{"role": "user", "content": "Hello"}]


def test_chat_n_samples_and_usage(lm):
    before = lm.usage.calls
    gens = lm.chat(HELLO, n=3, temperature=1.0, max_tokens=6, seed=1)
    assert len(gens) == 3 and all(g.finish_reason in ("stop", "length") for g in gens)
    assert all(1 <= g.completion_tokens <= 6 for g in gens)
    assert lm.usage.calls == before + 1 and lm.usage.prompt_tokens > 0 and lm.usage.completion_tokens >= 3


def test_batch_keeps_request_order(lm):
    requests = [Request([{"role": "user", "content": f"Question {i}"}], max_tokens=5) for i in range(5)]
    batch = lm.chat_batch(requests)
    singles = [lm.chat(r.messages, max_tokens=5)[0].text for r in requests]
    assert [b[0].text for b in batch] == singles  # greedy: batching changes nothing


def test_a_request_that_outgrows_the_context_is_refused_alone(lm):
    """Both backends refuse a conversation longer than the context as `Refused`; `chat_each` gives it no
    generations and the rest of the batch their replies (a strategy's own long prompt ended the evaluation),
    each asked and counted once (through a server, the batch was sent again one by one: twice the calls)."""
    from pocketgpt.reason.lm import Refused

    long = Request([{"role": "user", "content": "word " * 3000}], max_tokens=4)
    short = Request(HELLO, max_tokens=4)
    with pytest.raises(Refused):
        lm.chat_batch([short, long])
    before = lm.usage.calls
    replies = lm.chat_each([short, long, short])
    assert lm.usage.calls == before + 2
    assert replies[1] == [] and replies[0][0].text == replies[2][0].text == lm.chat(HELLO, max_tokens=4)[0].text


def test_a_reply_gets_what_the_context_leaves(lm):
    """A strategy asks for 256 tokens whatever the model: the local model fitted that to its context, and a
    server answered 400 (`max_tokens 256 + the prompt's 12 tokens exceed the context of 128`)."""
    gens = lm.chat([{"role": "user", "content": "word " * 100}], max_tokens=1024, temperature=0)  # the context
    assert gens and gens[0].completion_tokens >= 1


def test_a_requests_samples_do_not_depend_on_its_place_in_the_batch(lm):
    """Locally, a seeded request drew other samples as the second request of a batch than alone (the seed
    followed the batch position); a server's do not, and results then differed between the two backends."""
    a = Request([{"role": "user", "content": "Question one"}], n=2, temperature=1.0, max_tokens=8, seed=7)
    b = Request(HELLO, n=2, temperature=1.0, max_tokens=8, seed=7)
    alone = [g.text for g in lm.chat_batch([b])[0]]
    assert [g.text for g in lm.chat_batch([a, b])[1]] == alone


def test_json_schema_is_held(lm):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    for g in lm.chat(HELLO, n=4, temperature=1.0, max_tokens=20, seed=2, json_schema=schema):
        assert 0 <= json.loads(g.text)["a"] <= 9


def test_a_choice_is_held_verbatim(lm):
    # Quotes, backslashes and Chinese must survive the grammar's string literals, on both backends.
    options = ('He said "hi".', "a\\b", "你好。", "The capital of Velmo is Dorin.")
    texts = [g.text for g in lm.chat(HELLO, n=8, temperature=1.0, max_tokens=40, seed=3, choices=options)]
    assert all(t in options for t in texts) and len(set(texts)) > 1


def test_a_regex_holds_the_reply(lm):
    # A random model answers "at once" only because the pattern allows nothing else (the direct strategy).
    texts = [g.text for g in lm.chat(HELLO, n=8, temperature=1.0, max_tokens=8, seed=3, regex=r"-?[0-9]{1,4}")]
    assert all(re.fullmatch(r"-?[0-9]{1,4}", t) for t in texts) and len(set(texts)) > 1


def test_both_backends_give_the_same_greedy_answers(run, served):
    local, remote = LM.load(run, device="cpu"), LM.openai(served + "/v1", api_key=KEY, model="sft")
    for content in ("Hello", "What is 2 + 2?", "你好"):
        messages = [{"role": "user", "content": content}]
        assert local.chat(messages, max_tokens=8)[0].text == remote.chat(messages, max_tokens=8)[0].text


def test_a_required_tool_call_and_its_result_round_trip(lm):
    from test_serve import CALCULATOR  # its expression is bounded: a random model closes the string

    from pocketgpt.reason.lm import tool_call_messages

    messages = [{"role": "user", "content": "What is 12 * 7?"}]
    [g] = lm.chat(messages, tools=[CALCULATOR], tool_choice="required", max_tokens=48)
    assert g.finish_reason == "tool_calls" and g.tool_calls[0]["name"] == "calculator"
    assert isinstance(g.tool_calls[0]["arguments"]["expression"], str)
    follow = messages + tool_call_messages(g, ["84"])
    assert follow[-1] == {"role": "tool", "tool_call_id": "call_0_0", "name": "calculator", "content": "84"}
    [after] = lm.chat(follow, max_tokens=4)  # the backend takes the call and its result back
    assert after.finish_reason in ("stop", "length")


def test_completions_continue_documents_on_both_backends(run, served):
    local, remote = LM.load(run, device="cpu"), LM.openai(served + "/v1", api_key=KEY, model="sft")
    prompts = ["Q: What is 2 + 2?\nA:", "The capital of"]
    near, far = local.complete_batch(prompts, max_tokens=6), remote.complete_batch(prompts, max_tokens=6)
    assert [g.text for g in near] == [g.text for g in far] and all(g.completion_tokens > 0 for g in near)
    assert local.usage.calls == 2 and remote.usage.completion_tokens > 0


def test_a_local_lm_prefills_only_what_a_continued_reply_adds(run):
    """A strategy that continues its own reply step by step (a searching chain, a proposal written move by
    move) sends the conversation again, a little longer each time: the local backend's prefix cache supplies
    what it has seen, with the same replies as without it."""
    reply = "4 + 8 = 12 (left: 4 6 12)\n" * 4
    steps = [[*HELLO, {"role": "assistant", "content": reply[:cut]}] for cut in (0, 26, 52, 104)]
    cached, plain = LM.load(run, device="cpu"), LM.load(run, device="cpu", prefix_cache_mb=0)
    texts = {name: [lm.chat(messages, max_tokens=8, continue_final=True)[0].text for messages in steps]
             for name, lm in (("cached", cached), ("plain", plain))}
    cache = cached.engine.prefix_cache
    assert plain.engine.prefix_cache is None
    assert cache.hit_tokens >= 3 * BLOCK  # the later steps start with blocks the earlier ones prefilled
    assert texts["cached"] == texts["plain"]


def test_a_server_that_is_not_there_is_one_error():
    """`eval --server` with a wrong URL ended in the openai client's APIConnectionError traceback."""
    from pocketgpt.common import PocketError

    with pytest.raises(PocketError, match="no OpenAI-compatible server answers there"):
        LM.openai("http://127.0.0.1:9/v1")
    silent = LM.openai("http://127.0.0.1:9/v1", model="sft")  # named: the first request finds out
    with pytest.raises(PocketError, match="the server stopped answering"):
        silent.chat([{"role": "user", "content": "hi"}], max_tokens=2)


def test_a_refused_batch_leaves_nothing_decoding(run):
    """The local model queued a batch's requests one by one and was refused at a later one: the earlier ones
    went on decoding in the engine for nobody, slowing every later request."""
    from pocketgpt.reason.lm import Refused

    lm = LM.load(run, device="cpu")
    short = Request(HELLO, n=4, max_tokens=50)
    with pytest.raises(Refused):
        lm.chat_batch([short, short, Request([{"role": "user", "content": "word " * 3000}])])
    assert not lm.engine.busy
