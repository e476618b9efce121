from dataclasses import replace

import pytest
import torch

from pocketgpt.common import PocketError
from pocketgpt.engine import Engine, SamplingParams, Sequence, penalize, sample_next, sample_seed


@pytest.fixture(params=["tiny_model", "smeared_model"])
def model(request):
    """A plain Llama, and one with smeared keys (the cache keeps plain keys; the mix is taken where they are read)."""
    return request.getfixturevalue(request.param)


def test_cached_decoding_equals_uncached(model):
    torch.manual_seed(1)
    x = torch.randint(0, 512, (2, 30))
    full = model(x)
    cache = model.make_cache(2)
    prefill = model(x[:, :10], cache=cache)
    steps = [model(x[:, t:t + 1], cache=cache) for t in range(10, 30)]
    torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_uncached(model):
    x = torch.randint(0, 512, (1, 24))
    cache = model.make_cache(1)
    parts = [model(x[:, a:b], cache=cache) for a, b in [(0, 7), (7, 15), (15, 24)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(x), atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_argmax_loop(tiny_model, tokenizer):
    prompt = tokenizer.encode("The return statement")
    out = Engine(tiny_model, tokenizer).generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(tiny_model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.tokens == ids[len(prompt):]
    assert out.finish_reason == "length"


def test_bf16_prefill_keeps_float32_weights_and_cache_and_nearly_the_logits(tiny_model, tokenizer):
    prompt = tokenizer.encode("The while statement is used for repeated execution as long as an expression is true")
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    exact, fast = (Engine(tiny_model, tokenizer, prefill_dtype=d) for d in ("float32", "bfloat16"))
    a, b = exact.generate([prompt], params)[0], fast.generate([prompt], params)[0]
    assert fast.cache.k[0].dtype == torch.float32 and tiny_model.lm_head.weight.dtype == torch.float32
    # the first token's log-probabilities come from the bf16 prefill: close to fp32's, not equal
    first_exact, first_fast = a.logprobs[0], b.logprobs[0]
    assert first_fast != first_exact and abs(first_fast - first_exact) < 0.05
    with pytest.raises(PocketError, match="prefill_dtype"):
        Engine(tiny_model, tokenizer, prefill_dtype="float16")


def test_prompts_arriving_together_prefill_in_one_pass_and_decode_as_they_would_alone(tiny_model, tokenizer,
                                                                                       monkeypatch):
    engine = Engine(tiny_model, tokenizer)
    prompts = [tokenizer.encode(t) for t in ("The while statement is used for", "x = y + 1", "import os",
                                             "The return statement")]  # 10, 9, 7 and 6 tokens
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=0)
    passes = []
    forward = tiny_model.hidden_states
    monkeypatch.setattr(tiny_model, "hidden_states", lambda ids, *a, **k: passes.append(ids.shape) or forward(ids, *a, **k))
    batched = engine.generate(prompts, params)
    assert passes == [(4, 10)]  # the four prompts, right-padded, in one pass
    for p, b in zip(prompts, batched):
        alone = engine.generate([p], params)[0]
        assert alone.tokens == b.tokens
        assert alone.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_prefill_groups_pad_at_most_half_what_they_hold(tiny_model, tokenizer):
    """A long prompt beside short ones is its own pass: padding every short one to its length would cost
    more than the passes it saves."""
    engine = Engine(tiny_model, tokenizer)
    engine.waiting = [s for p in ([1] * 3, [2] * 4, [3] * 60, [4] * 2, [5] * 3)
                      for s in engine.sequences(p, SamplingParams(max_tokens=1))]
    seqs = list(engine.waiting)
    engine._admit()  # rows 0 to 4, in that order
    groups = engine._prefill_groups([(s, s.prompt) for s in seqs])
    assert [[len(c) for _, c in g] for g in groups] == [[3, 4], [60], [2, 3]]


def test_n_samples_share_prefill_and_are_reproducible(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    params = SamplingParams(max_tokens=8, temperature=1.0, n=4, seed=7)
    a = engine.generate([tokenizer.encode("hello")], params)
    b = engine.generate([tokenizer.encode("hello")], params)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert len({tuple(c.tokens) for c in a}) > 1
    assert all(c.prompt_index == 0 for c in a)


def test_any_integer_seed_is_a_reproducible_stream(tiny_model, tokenizer):
    """OpenAI clients may send any integer as the seed: 2**53 made torch.Generator overflow (a 500)."""
    engine = Engine(tiny_model, tokenizer)
    prompt = [tokenizer.encode("hello")]
    runs = {seed: engine.generate(prompt, SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=seed))
            for seed in (2 ** 53, -2 ** 70, 2 ** 70)}
    for seed, first in runs.items():
        again = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=seed))
        assert [c.tokens for c in again] == [c.tokens for c in first]
    assert sample_seed(7, 1) == 7 * 1_000_003 + 1  # small seeds keep the streams they always had
    # a CPU generator keeps a seed's low 32 bits: seeds apart by 2**32 drew the same samples
    params = SamplingParams(max_tokens=8, temperature=1.0, n=2)
    apart = [engine.generate(prompt, replace(params, seed=seed)) for seed in (42, 42 + 2 ** 32)]
    assert [c.tokens for c in apart[0]] != [c.tokens for c in apart[1]]


def test_an_engine_without_room_for_a_row_is_refused(tiny_model, tokenizer):
    with pytest.raises(PocketError, match="at least 1"):  # it would wait for a free row forever
        Engine(tiny_model, tokenizer, max_batch=0)


def test_stop_token_and_string(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    prompt = tokenizer.encode("The")
    free = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    stop_tok = free.tokens[3]
    out = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_tokens=(stop_tok,)))[0]
    assert out.finish_reason == "stop" and out.tokens[-1] == stop_tok
    assert out.tokens == free.tokens[:free.tokens.index(stop_tok) + 1]
    text = free.text
    # Two characters from the middle on that are not blank: a stop string of spaces would say little.
    needle = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].strip())
    cut = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_strings=(needle,)))[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(needle)]


def test_special_tokens_written_by_the_model_are_not_text(tiny_model, tokenizer):
    """A model that goes on past its end of turn (ignore_eos, or a small model) wrote "<|assistant_end|>"
    into replies as text, which a client then sends back as user text imitating a special token."""
    from pocketgpt.engine import TextStream, TokenEvent, visible_text

    special = tokenizer.special("<|assistant_end|>")
    tokens = [*tokenizer.encode("yes"), special, *tokenizer.encode(" and"), special, special]
    params = SamplingParams(max_tokens=20)
    assert visible_text(tokenizer, tokens, params) == "yes and"
    stream = TextStream(tokenizer, params)
    pieces = [stream.push(TokenEvent(0, t, i == len(tokens) - 1, "length" if i == len(tokens) - 1 else None))
              for i, t in enumerate(tokens)]
    assert "".join(pieces) == "yes and"
    # forced by a logit bias, the engine's reply holds the special token and its text does not
    out = Engine(tiny_model, tokenizer).generate([tokenizer.encode("The")], SamplingParams(
        max_tokens=4, temperature=0, logit_bias=((special, 100.0),)))[0]
    assert out.tokens == [special] * 4 and out.text == ""


def test_a_stream_holds_back_the_longest_start_of_any_stop_string(tokenizer):
    """With stops ("dZ", "led betw"), the stream held back only the "d" that may start "dZ" and sent "le", which
    the finished reply leaves out with the rest of "led betw"."""
    from pocketgpt.engine import TextStream, TokenEvent, visible_text

    params = SamplingParams(stop_strings=("dZ", "led betw"))
    ids = tokenizer.encode(" small town nestled between two")
    stream, sent = TextStream(tokenizer, params), ""
    for i, token in enumerate(ids):
        cut = "led betw" in tokenizer.decode(ids[:i + 1])
        sent += stream.push(TokenEvent(0, token, cut, "stop" if cut else None))
        if cut:
            break
    assert cut and sent == visible_text(tokenizer, ids[:i + 1], params) == " small town nest"


def test_a_tiny_temperature_is_greedy(tiny_model, tokenizer):
    """Logits divided by 1e-38 overflowed float32, and the draw over the NaNs picked arbitrary tokens."""
    engine = Engine(tiny_model, tokenizer)
    prompt = tokenizer.encode("The")
    greedy = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].tokens
    for tiny in (1e-38, 1e-45, 1e-6):
        assert engine.generate([prompt], SamplingParams(max_tokens=8, temperature=tiny, top_p=0.9))[0].tokens == greedy


def test_stream_concatenates_to_generate(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    params = SamplingParams(max_tokens=15, temperature=0.8, seed=3)
    prompt = tokenizer.encode("def ")
    assert "".join(engine.stream(prompt, params)) == engine.generate([prompt], params)[0].text


def test_logits_processor_can_force_a_token(tiny_model, tokenizer):
    forced = tokenizer.encode("!")[0]

    def only_bang(generated, logits):
        mask = torch.full_like(logits, float("-inf"))
        mask[forced] = 0
        return logits + mask

    out = Engine(tiny_model, tokenizer).generate([tokenizer.encode("hi")], SamplingParams(max_tokens=5),
                                                 [only_bang])[0]
    assert out.tokens == [forced] * 5


def test_top_k_and_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingParams(top_k=2), g)) for _ in range(200)}
    assert picks == {2, 3}
    # p(3) = 0.64, p(2) = 0.24: top_p=0.5 keeps only the top token, 0.8 keeps two
    assert {int(sample_next(logits, SamplingParams(top_p=0.5), g)) for _ in range(100)} == {3}
    assert {int(sample_next(logits, SamplingParams(top_p=0.8), g)) for _ in range(300)} == {2, 3}
    assert int(sample_next(logits, SamplingParams(temperature=0), g)) == 3


def test_top_k_and_top_p_over_a_large_vocabulary_keep_what_a_full_sort_keeps():
    """The filter sorts only the largest candidates, more while a row's nucleus may reach past them: peaked
    and flat rows, top_k above the first candidates, and a row without a filter beside filtered ones keep
    exactly the tokens a full sort keeps."""
    from pocketgpt.engine import FILTER_CANDIDATES, _nucleus, sample_rows

    torch.manual_seed(0)
    V = 3000
    scales = torch.tensor([8.0, 4.0, 1.0, 0.05, 8.0, 0.05, 1.0])[:, None]  # peaked ... nearly flat
    logits = torch.randn(len(scales), V) * scales
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5, top_k=3), SamplingParams(top_p=0.95),
              SamplingParams(top_p=0.9), SamplingParams(top_k=FILTER_CANDIDATES * 3), SamplingParams(),
              SamplingParams(top_k=FILTER_CANDIDATES + 1, top_p=0.999)]

    def kept_by_full_sort(row, p):
        values, order = torch.sort(row, descending=True)
        probs = torch.softmax(values, -1)
        keep = (probs.cumsum(-1) - probs <= p.top_p) & (torch.arange(V) < (p.top_k or V))
        return set(order[keep].tolist())

    expected = [kept_by_full_sort(row, p) for row, p in zip(logits, params)]
    assert len(expected[3]) > FILTER_CANDIDATES * 4  # a flat row: the search goes past the first two rounds
    assert len(expected[5]) == V
    seen = [set() for _ in params]
    for seed in range(300):
        generators = [torch.Generator().manual_seed(seed * 10 + i) for i in range(len(params))]
        for row, token in enumerate(sample_rows(logits, params, generators).tolist()):
            seen[row].add(token)
    assert all(seen[row] <= expected[row] for row in range(len(params)))
    assert len(seen[1]) == len(expected[1]) == 1 and len(seen[5]) > 250  # the unfiltered row ranges widely
    top_k = torch.tensor([p.top_k or V for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    values, order = _nucleus(logits, top_k, top_p)
    assert [set(ids[v > float("-inf")].tolist()) for v, ids in zip(values, order)] == expected


def test_sampling_follows_the_distribution_per_row_with_its_own_generator():
    """Frequencies match softmax(logits / T) (a zero-probability token never comes up), and a seeded row
    draws the same tokens whatever else shares its batch."""
    from pocketgpt.engine import sample_rows

    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]]).repeat(8000, 1)
    params = SamplingParams(temperature=2.0)
    picks = sample_rows(logits, [params] * 8000, [None] * 8000)
    freq = torch.bincount(picks, minlength=4).float() / 8000
    expected = torch.softmax(logits[0] / 2.0, dim=-1)
    assert freq[3] == 0 and torch.allclose(freq, expected, atol=0.02)
    g_alone, g_crowded = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    alone = [int(sample_rows(logits[:1], [params], [g_alone])[0]) for _ in range(30)]
    crowded = [sample_rows(logits[:3], [params, SamplingParams(temperature=0), params], [None, None, g_crowded])
               for _ in range(30)]
    assert alone == [int(c[2]) for c in crowded] and len(set(alone)) == 3
    assert all(int(c[1]) == 2 for c in crowded)  # the greedy row


def test_sampling_over_logits_wider_than_float32_keeps_the_distribution_and_its_zeros(monkeypatch):
    """Logits spanning hundreds of nats (a real vocabulary's tail; exp underflows past -87) sample as
    softmax says, top_p keeps the same nucleus, and a -inf token never comes up, even from the draws at the
    float edges (u = 0, u just below 1) where the tail's floor could reach it."""
    import pocketgpt.engine as engine

    row = torch.tensor([float("-inf"), -300.0, -95.0, -90.0, 0.0, 1.0, 2.0, -120.0, float("-inf")])
    logits = row.repeat(20000, 1)
    picks = engine.sample_rows(logits, [SamplingParams()] * 20000, [None] * 20000)
    freq = torch.bincount(picks, minlength=len(row)).double() / 20000
    expected = torch.softmax(row.double(), dim=-1)
    assert torch.allclose(freq, expected, atol=0.015) and freq[[0, 1, 2, 3, 7, 8]].sum() == 0
    values, order = engine._nucleus(logits[:1], torch.tensor([len(row)]), torch.tensor([0.7]))
    assert order[0][values[0] > float("-inf")].tolist() == [6, 5]
    for edge in (0.0, 1.0 - 2.0 ** -24):
        monkeypatch.setattr(engine.torch, "rand", lambda *a, edge=edge, **k: torch.full((1,), edge))
        assert int(engine.sample_rows(logits[:1], [SamplingParams()], [None])[0]) in (4, 5, 6)


def test_banned_tokens_are_never_sampled_in_their_own_rows_only(tiny_model, chat):
    engine = Engine(tiny_model, chat.tokenizer)
    greedy = SamplingParams(max_tokens=1, temperature=0)
    favourite = engine.generate([[1, 2, 3]], greedy)[0].tokens[0]
    banning = SamplingParams(max_tokens=20, temperature=1.0, n=4, seed=0, banned_tokens=(favourite,))
    free = engine.submit([1, 2, 3], greedy)
    outs = engine.generate([[1, 2, 3]], banning)  # steps the engine: `free` decodes in the same batches
    assert all(favourite not in c.tokens for c in outs) and sum(len(c.tokens) for c in outs) > 0
    assert free[0].tokens == [favourite]
    assert chat.tool_call_token == chat.tool_call_markers[0] and isinstance(chat.tool_call_token, int)


def test_logit_bias_and_penalties_follow_openais_formula():
    """logit + bias - frequency x count - presence x (count > 0), per row, other tokens and rows untouched."""
    logits = torch.randn(3, 10)
    penalized = Sequence([1], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((7, 3.0), (2, -1.0))),
                         [], 0, 0, False)
    penalized.counts = {2: 3, 4: 1}
    plain = Sequence([1], SamplingParams(), [], 1, 0, False)
    plain.counts = {2: 5}
    biased = Sequence([1], SamplingParams(logit_bias=((0, -100.0),)), [], 2, 0, False)
    out = penalize(logits, [penalized, plain, biased])
    expected = logits.clone()
    expected[0, 2] += -1.0 - 0.25 * 3 - 0.5
    expected[0, 4] += -0.25 - 0.5
    expected[0, 7] += 3.0
    expected[2, 0] -= 100
    assert torch.allclose(out, expected)
    assert penalize(logits, [plain]) is logits  # nothing asked: no copy


def test_logit_bias_bans_and_forces_and_a_presence_penalty_stops_repeats(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    greedy = SamplingParams(max_tokens=24, temperature=0)
    free = engine.generate([[1, 2, 3]], greedy)[0].tokens
    assert len(set(free)) < len(free)  # the untrained model repeats itself greedily: what the penalty must undo
    banned = engine.generate([[1, 2, 3]], replace(greedy, logit_bias=((free[0], -100.0),)))[0].tokens
    assert free[0] not in banned
    forced = engine.generate([[1, 2, 3]], replace(greedy, max_tokens=5, logit_bias=((42, 100.0),)))[0].tokens
    assert forced == [42] * 5
    fresh = engine.generate([[1, 2, 3]], replace(greedy, presence_penalty=2.0))[0].tokens
    assert len(set(fresh)) == len(fresh) == 24  # its logits span less than 2: no token is picked twice
    # sampled: the penalty comes before the temperature divides the logits, as in OpenAI's and vLLM's samplers
    cool = SamplingParams(max_tokens=24, temperature=0.2, seed=0, n=4)
    repeats = [len(c.tokens) - len(set(c.tokens)) for c in engine.generate([[1, 2, 3]], cool)]
    penalized = [len(c.tokens) - len(set(c.tokens))
                 for c in engine.generate([[1, 2, 3]], replace(cool, frequency_penalty=2.0))]
    assert min(repeats) > 0 and penalized == [0, 0, 0, 0]


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "the prompt is empty"),
    ([1] * 128, SamplingParams(), "the prompt has 128 tokens; the model's context is 128"),
    ([1, 512], SamplingParams(), "token id 512, outside the vocabulary"),
    ([1, -1], SamplingParams(), "token id -1, outside the vocabulary"),
    ([1], SamplingParams(max_tokens=0), "max_tokens must be at least 1, not 0"),
    ([1], SamplingParams(n=0), "n must be at least 1"),
    ([1], SamplingParams(temperature=-0.5), "temperature must be at least 0"),
    ([1], SamplingParams(top_k=-1), "top_k must be at least 0"),
    ([1], SamplingParams(top_p=0.0), "top_p must be above 0"),
    ([1], SamplingParams(logprobs=-2), "logprobs must be from 0 to the vocabulary's 512"),
    ([1], SamplingParams(logprobs=513), "logprobs must be from 0 to the vocabulary's 512"),  # topk failed the batch
    ([1], SamplingParams(presence_penalty=2.5), "presence_penalty must be from -2 to 2"),
    ([1], SamplingParams(frequency_penalty=float("nan")), "frequency_penalty must be from -2 to 2"),
    ([1], SamplingParams(logit_bias=((512, 1.0),)), "logit_bias names token id 512, outside the vocabulary"),
    ([1], SamplingParams(logit_bias=((5, -101.0),)), "logit_bias must be from -100 to 100"),
])
def test_bad_input_is_a_one_line_pocket_error(tiny_model, tokenizer, prompt, params, message):
    engine = Engine(tiny_model, tokenizer)
    assert tiny_model.cfg.max_seq_len == 128 and tiny_model.cfg.vocab_size == 512  # what the cases assume
    for call in (lambda: engine.submit(prompt, params), lambda: engine.generate([prompt], params)):
        with pytest.raises(PocketError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert not engine.busy  # nothing half-submitted


def test_a_prompt_that_leaves_one_token_of_room_gets_one_token(tiny_model, tokenizer):
    """max_tokens beyond what the context leaves is no error: the sequence stops at the context's end."""
    out = Engine(tiny_model, tokenizer).generate([[1] * 127], SamplingParams(max_tokens=50, temperature=0))[0]
    assert len(out.tokens) == 1 and out.finish_reason == "length"


def test_compiled_decode_step_matches_eager_and_compiles_only_in_warmup(model, tokenizer):
    """The compiled decode step writes the same tokens as the eager one, as the batch shrinks from many rows
    (matmuls) through a few to one (reductions), with rows of different lengths and shared prefills; after
    `warmup`, no batch compiles again."""
    from torch._dynamo.utils import counters

    prompts = [tokenizer.encode(t) for t in ("a", "The while statement is used for", "x = 1", "def f(x):",
                                             "import os", "The return statement leaves the current function")]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0) for i in range(len(prompts))]
    sampled = SamplingParams(max_tokens=9, temperature=1.0, n=2, seed=3)

    def run(engine):
        seqs = [s for i, (p, sp) in enumerate(zip(prompts, params)) for s in engine.submit(p, sp, prompt_index=i)]
        seqs += engine.submit(prompts[1], sampled, prompt_index=len(prompts))
        list(engine.run(seqs))
        return [s.tokens for s in seqs]

    compiled = Engine(model, tokenizer, max_batch=8, compile=True)
    assert compiled.warmup() > 0
    graphs = counters["stats"]["unique_graphs"]
    assert run(compiled) == run(Engine(model, tokenizer, max_batch=8))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after warmup
    assert Engine(model, tokenizer).warmup() == 0.0


def test_an_idle_engine_gives_its_cache_back(tiny_model, tokenizer):
    """The cache only grew (rows x the longest row): a server held what one burst had made, gigabytes."""
    engine = Engine(tiny_model, tokenizer, max_batch=8)
    small = engine.cache.rows * engine.cache.capacity
    done = engine.generate([tokenizer.encode("The")] * 8, SamplingParams(max_tokens=100, temperature=1.0, seed=0))
    assert max(len(c.tokens) for c in done) > 64  # the cache grew past its first 64 positions
    assert engine.cache.rows * engine.cache.capacity == small
    again = engine.generate([tokenizer.encode("The")], SamplingParams(max_tokens=5, temperature=0))[0]
    assert again.tokens == engine.generate([tokenizer.encode("The")], SamplingParams(max_tokens=5, temperature=0))[0].tokens


def test_a_short_prompt_is_answered_while_a_long_one_prefills(tiny_model, tokenizer):
    """The step's prefill budget went to the oldest prompt whole: a "hi" behind a 6,759-token prompt waited for
    all of it (225 s with SmolLM2)."""
    engine = Engine(tiny_model, tokenizer, prefill_chunk=16)
    (long,) = engine.submit([1] * 100, SamplingParams(max_tokens=1))
    engine.step()
    (short,) = engine.submit([2, 3, 4], SamplingParams(max_tokens=1))
    while not short.done:
        engine.step()
    assert long.pending and not long.done  # still prefilling when the short one had its answer
