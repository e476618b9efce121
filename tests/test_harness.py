import json
import math

import pytest

from pocketgpt.common import PocketError, read_jsonl
from pocketgpt.data.tasks import get_task
from pocketgpt.engine import SamplingParams
from pocketgpt.evaluate.harness import (
    bits_per_byte,
    chat_messages,
    copy_probes,
    copying,
    evaluate_task,
    fewshot_text,
    fit_to_context,
    model_mode,
    wilson_interval,
)


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_prompts_use_train_demos_only(chat):
    task = get_task("arithmetic")
    test_example = task.examples("test")[0]
    text = fewshot_text(task, test_example, shots=3)
    assert text.endswith(f"Q: {test_example.question}\nA:") and text.count("Q: ") == 4
    train_questions = {e.question for e in task.examples("train")}
    demo_questions = [line[3:] for line in text.split("\n") if line.startswith("Q: ")][:-1]
    assert all(q in train_questions for q in demo_questions)
    messages = chat_messages(task, test_example, shots=2, style="direct")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize("mode", ["fewshot", "chat"])
def test_evaluate_task_writes_consistent_verdicts(tiny_model, tokenizer, chat, tmp_path, mode):
    task = get_task("compare_decimals")
    out = tmp_path / "rows.jsonl"
    result = evaluate_task(tiny_model, chat, task, "test", n=12, shots=2, mode=mode, batch_size=5,
                           max_tokens=8, out_path=out, show_progress=False)
    rows = read_jsonl(out)
    assert result.n == len(rows) == 12 and 0 <= result.accuracy <= 1
    examples = task.examples("test")[:12]
    for row, example in zip(rows, examples):
        assert row["question"] == example.question
        assert row["correct"] == task.verify(example, row["output"])
        assert isinstance(row["tool_calls"], list)
    assert result.correct == sum(r["correct"] for r in rows)
    assert result.ci_low <= result.accuracy <= result.ci_high


def test_bad_mode_and_style(tiny_model, tokenizer, chat):
    with pytest.raises(PocketError, match="unknown eval mode"):
        evaluate_task(tiny_model, chat, get_task("spell"), mode="telepathy")
    with pytest.raises(PocketError, match="style"):
        evaluate_task(tiny_model, chat, get_task("spell"), style="tool", mode="chat")
    with pytest.raises(PocketError, match="unknown task"):
        get_task("poetry")
    with pytest.raises(PocketError, match="unknown split"):
        get_task("spell").examples("dev")


def test_bits_per_byte_of_an_untrained_model_is_log2_vocab_per_byte(tiny_model, tokenizer, chat):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)][:20]
    bpb = bits_per_byte(tiny_model, chat, texts, seq_len=64, batch_size=4, max_batches=5)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    nbytes = sum(len(t.encode()) for t in texts)
    expected = math.log2(tokenizer.vocab_size) * tokens / nbytes  # a near-uniform model pays log2(V) per token
    assert bpb == pytest.approx(expected, rel=0.15)


def test_model_mode(chat):
    assert model_mode({"meta": {"stage": "base"}}) == "fewshot"
    assert model_mode({"meta": {"stage": "sft"}}) == "chat"


def test_eval_cli(tiny_model, tokenizer, chat, tmp_path, capsys):
    from pocketgpt.checkpoint import save_model
    from pocketgpt.cli import main

    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base"})
    assert main(["eval", str(tmp_path), "--task", "spell,count_letter", "--n", "4", "--shots", "1",
                 "--bpb", "docs"]) == 0
    results = json.loads((tmp_path / "base" / "eval" / "results.json").read_text())
    assert {"spell", "count_letter", "bpb/docs"} <= set(results)
    assert len(read_jsonl(tmp_path / "base" / "eval" / "spell_test.jsonl")) == 4


@pytest.mark.parametrize("mode", ["fewshot", "chat"])
def test_diversity_fits_a_small_context(tiny_model, tokenizer, chat, mode):
    from pocketgpt.evaluate.harness import diversity

    tiny_model.cfg.max_seq_len = 64  # shorter than a few-shot prompt: the prompt must be cut, not fail
    d = diversity(tiny_model, chat, mode, n_prompts=3, samples=2, max_tokens=8)
    assert d["entropy"] > 0 and 0 <= d["distinct_names"] <= 1


def test_fit_to_context_leaves_room_to_answer(tiny_model):
    T = tiny_model.cfg.max_seq_len
    short = SamplingParams(max_tokens=10 * T)
    assert fit_to_context(tiny_model, [[1] * 10, [2] * 5], short) == [[1] * 10, [2] * 5]
    assert short.max_tokens == T - 10  # all that the longest prompt leaves
    long = SamplingParams(max_tokens=10 * T)
    cut = fit_to_context(tiny_model, [list(range(2 * T))], long)
    assert long.max_tokens == T // 2 and cut == [list(range(2 * T))[-(T - T // 2):]]  # the question stays


def test_copy_probes_need_only_copying():
    probes = copy_probes(n=20, seed=3)
    assert probes == copy_probes(n=20, seed=3) and probes != copy_probes(n=20, seed=4)
    for (p_expr, typed), (p_result, result) in zip(probes["expression"], probes["result"]):
        question = p_expr.splitlines()[-1].removesuffix(": type")
        assert typed == question.replace(" ", "").replace("×", "*")  # the line's own sum, retyped
        assert p_result.startswith(p_expr) and f"shows {result}, so {question} =" in p_result


def test_copying_scores_a_model(tiny_model, tokenizer, chat):
    scores = copying(tiny_model, chat, n=4)
    assert set(scores) == {"expression", "result"} and all(0 <= v <= 1 for v in scores.values())
