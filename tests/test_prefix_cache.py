import torch

from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.prefix_cache import BLOCK, PrefixCache, block_keys

SYSTEM = ("The while statement is used for repeated execution as long as an expression is true. "
          "The for statement is used to iterate over the elements of a sequence.")
GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=0)


def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY):
    seq = engine.submit(prompt, params)[0]
    for _ in engine.run([seq]):
        pass
    return seq


def test_a_shared_beginning_is_copied_not_prefilled_and_answers_the_same(tiny_model, tokenizer):
    """The second prompt with the same first blocks takes them from the cache: only the rest is prefilled,
    and its greedy tokens and log-probabilities are those of an engine without the cache."""
    first = tokenizer.encode(SYSTEM + " Question one?")
    second = tokenizer.encode(SYSTEM + " And another question, a longer one?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 2 * BLOCK
    cached, plain = Engine(tiny_model, tokenizer, prefix_cache_mb=16), Engine(tiny_model, tokenizer)
    assert run(cached, first).cached == 0
    again = run(cached, second)
    assert again.cached == shared // BLOCK * BLOCK
    reference = run(plain, second)
    assert again.tokens == reference.tokens
    torch.testing.assert_close(torch.tensor(again.logprobs), torch.tensor(reference.logprobs), atol=1e-4, rtol=0)
    assert cached.prefix_cache.hit_tokens == again.cached


def test_the_next_turn_of_a_conversation_reuses_the_reply_too(tiny_model, tokenizer):
    """A finished sequence files its reply's blocks: the next turn, prompt + reply + more, finds them."""
    engine = Engine(tiny_model, tokenizer, prefix_cache_mb=16)
    prompt = tokenizer.encode(SYSTEM)
    turn = run(engine, prompt, SamplingParams(max_tokens=3 * BLOCK, temperature=0))
    follow_up = prompt + turn.tokens + tokenizer.encode(" Tell me more.")
    fed = len(prompt) + len(turn.tokens) - 1  # the last sampled token never went through the model
    assert run(engine, follow_up).cached == fed // BLOCK * BLOCK > len(prompt)


def test_a_prompt_found_whole_still_prefills_its_last_token_and_n_samples_share_it(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer, prefix_cache_mb=16)
    prompt = tokenizer.encode(SYSTEM)[:3 * BLOCK]
    first = run(engine, prompt)
    again = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0, n=2))
    for _ in engine.run(again):
        pass
    assert again[0].cached == 2 * BLOCK  # the third block holds the last token: prefilled for its logits
    assert again[0].tokens == again[1].tokens == first.tokens


def test_same_tokens_after_a_different_beginning_are_not_a_hit(tiny_model, tokenizer):
    """A block is known by everything before it: equal second blocks after different first ones differ."""
    cache = tiny_model.make_cache(1, 64)
    store = PrefixCache(2**20)
    a = list(range(1, 2 * BLOCK + 1))
    b = list(range(100, 100 + BLOCK)) + a[BLOCK:]
    store.store(cache, 0, a, block_keys(a, []))
    assert store.match(b, block_keys(b, [])) == 0
    assert store.match(a + [7], block_keys(a + [7], [])) == 2


def test_the_cache_stays_within_its_budget_dropping_the_least_recently_used(tiny_model):
    cache = tiny_model.make_cache(1, 128)
    per_block = 2 * tiny_model.cfg.n_layer * tiny_model.cfg.n_kv_head * BLOCK * tiny_model.cfg.head_dim * 4
    store = PrefixCache(3 * per_block)
    old, new = list(range(1, 2 * BLOCK + 1)), list(range(200, 200 + 2 * BLOCK))
    store.store(cache, 0, old, block_keys(old, []))
    store.store(cache, 0, new, block_keys(new, []))
    assert store.bytes <= 3 * per_block and len(store.blocks) == 3
    assert store.match(new, block_keys(new, [])) == 2 and store.match(old, block_keys(old, [])) == 0
