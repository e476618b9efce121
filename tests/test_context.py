from pocketgpt.context import fit_shots_to_context, fit_to_context
from pocketgpt.engine import SamplingParams


def test_fit_to_context_leaves_room_to_answer(tiny_model):
    T = tiny_model.cfg.max_seq_len
    short = SamplingParams(max_tokens=10 * T)
    assert fit_to_context(tiny_model, [[1] * 10, [2] * 5], short) == [[1] * 10, [2] * 5]
    assert short.max_tokens == T - 10  # all that the longest prompt leaves
    long = SamplingParams(max_tokens=10 * T)
    cut = fit_to_context(tiny_model, [list(range(2 * T))], long)
    assert long.max_tokens == T // 2 and cut == [list(range(2 * T))[-(T - T // 2):]]  # the question stays


def test_prompts_too_long_drop_whole_solved_examples_before_anything_is_cut(tiny_model):
    """A prompt of k examples is 10 + 20k tokens here; the room is 64: two examples fit, and the prompt keeps
    its beginning (the chat template's opening). Only a question too long on its own is cut from the left."""
    T = tiny_model.cfg.max_seq_len
    build = lambda i, k: [7] + [i] * (9 + 20 * k) if i < 2 else list(range(100 + k))  # noqa: E731
    params = SamplingParams(max_tokens=T // 2)
    prompts, fewer, fewest = fit_shots_to_context(tiny_model, [build(i, 5) for i in range(3)], params, build, 5)
    assert params.max_tokens == T // 2 and all(len(p) <= T - T // 2 for p in prompts)
    assert prompts[:2] == [build(0, 2), build(1, 2)] and prompts[0][0] == 7
    assert prompts[2] == list(range(100))[-(T - T // 2):] and (fewer, fewest) == (3, 0)
    fits = SamplingParams(max_tokens=8)
    assert fit_shots_to_context(tiny_model, [build(0, 1)], fits, build, 1) == ([build(0, 1)], 0, 1)
