import json
import math

import pytest
import torch

from pocketgpt.common import PocketError, read_jsonl, wilson_interval
from pocketgpt.data.tasks import default_world, get_task
from pocketgpt.data.tasks.tools import task_tools
from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.evaluate.harness import (
    bits_per_byte,
    chat_messages,
    copy_probes,
    copying,
    evaluate_suite,
    evaluate_task,
    fewshot_text,
    model_mode,
)
from pocketgpt.toolloop import generate_with_tools


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


def answer_alone(model, chat, task, example, mode: str) -> tuple[str, list]:
    """The model's greedy answer to one question asked by itself (few-shot document, or chat with
    the tools run), as evaluate_task asks it with shots=2, max_tokens=8."""
    engine = Engine(model, chat.tokenizer)
    if mode == "fewshot":
        params = SamplingParams(max_tokens=8, temperature=0, stop_tokens=chat.document_stops,
                                stop_strings=("\n\n", "\nQ:"))
        return engine.generate([chat.document(fewshot_text(task, example, 2))], params)[0].text.strip(), []
    params = SamplingParams(max_tokens=8, temperature=0, stop_tokens=chat.stop_ids)
    prompt = chat.prompt(chat_messages(task, example, 2, "direct"))
    transcript = generate_with_tools(engine, chat, [prompt], params, task_tools(default_world()))[0]
    return transcript.text.strip(), transcript.calls


@pytest.mark.parametrize("mode,compile", [("fewshot", False), ("chat", False), ("chat", True)])
def test_evaluate_task_writes_consistent_verdicts(tiny_model, tokenizer, chat, tmp_path, mode, compile):
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: a model whose answers depend on the question
        for p in tiny_model.parameters():
            p.normal_(0, 0.5)
    task = get_task("compare_decimals")
    out = tmp_path / "rows.jsonl"
    result = evaluate_task(tiny_model, chat, task, "test", n=12, shots=2, mode=mode, batch_size=5,
                           max_tokens=8, out_path=out, show_progress=False, compile=compile)
    rows = read_jsonl(out)
    assert result.n == len(rows) == 12
    examples = task.examples("test")[:12]
    # Batched by length and put back in order, each row holds the answer to its own question (compiled
    # or not: the one-at-a-time answers are eager).
    assert len({r["output"] for r in rows}) > 1  # (different answers: a row given another's would show)
    for row, example in zip(rows, examples):
        assert row["question"] == example.question
        assert (row["output"], row["tool_calls"]) == answer_alone(tiny_model, chat, task, example, mode)
        assert row["correct"] == task.verify(example, row["output"])
    assert result.correct == sum(r["correct"] for r in rows) and result.accuracy == result.correct / 12
    assert (result.ci_low, result.ci_high) == wilson_interval(result.correct, 12)


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
                 "--bpb", "docs,world"]) == 0
    results = json.loads((tmp_path / "base" / "eval" / "results.json").read_text())
    for name in ("spell", "count_letter"):  # the summary agrees with the verdicts written beside it
        rows = read_jsonl(tmp_path / "base" / "eval" / f"{name}_test.jsonl")
        assert len(rows) == results[name]["n"] == 4 and results[name]["mode"] == "fewshot"
        assert results[name]["accuracy"] == sum(r["correct"] for r in rows) / 4
    # where and when it was measured, so that figures quoted from it can say so
    assert results["measured"]["torch"] == torch.__version__ and results["measured"]["cores"] >= 1
    # an untrained model pays about log2(vocab) bits per token: several bits per byte; the world's documents
    # include conversations (its chat logs), packed through the chat template as pretraining packs them
    for kind in ("docs", "world"):
        assert 1 < results[f"bpb/{kind}"] < 2 * math.log2(tokenizer.vocab_size)


def test_a_suites_results_are_one_measurement_per_task_read_where_they_lie(tiny_model, chat, tmp_path):
    """An evaluation on another split into the same folder replaced the test figures (and the card called
    them test-split ones); a run moved, or copied, read its answers from the old place (or the other run)."""
    import shutil

    from pocketgpt.evaluate.report import hallucination

    tasks = {"factqa_head": "direct", "factqa_unseen": "direct"}
    evaluate_suite(tiny_model, chat, tmp_path / "run" / "sft" / "eval", tasks, "chat", n=4, log=lambda _: None)
    before = (tmp_path / "run" / "sft" / "eval" / "results.json").read_text()
    with pytest.raises(PocketError, match="holds factqa_head measured with .*'test'.* this evaluation asks for "
                                          ".*'validation'.* give another --out"):
        evaluate_suite(tiny_model, chat, tmp_path / "run" / "sft" / "eval", tasks, "chat", split="validation", n=4)
    assert (tmp_path / "run" / "sft" / "eval" / "results.json").read_text() == before
    shutil.move(tmp_path / "run", tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    rows = [{**r, "output": "I don't know."} for r in read_jsonl(tmp_path / "copy" / "sft" / "eval" / "factqa_unseen_test.jsonl")]
    (tmp_path / "copy" / "sft" / "eval" / "factqa_unseen_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert hallucination(tmp_path / "copy", "sft")["hallucination_rate"] == 0  # its own answers, all refusals
    assert hallucination(tmp_path / "moved", "sft")["hallucination_rate"] == 1  # a random model never refuses


@pytest.mark.parametrize("mode", ["fewshot", "chat"])
def test_diversity_fits_a_small_context(tiny_model, tokenizer, chat, mode):
    from pocketgpt.evaluate.harness import diversity

    tiny_model.cfg.max_seq_len = 64  # shorter than a few-shot prompt: the prompt must be cut, not fail
    d = diversity(tiny_model, chat, mode, n_prompts=3, samples=2, max_tokens=8)
    # An untrained model is close to uniform: its entropy, in nats, is close to log(vocab).
    assert d["entropy"] == pytest.approx(math.log(tokenizer.vocab_size), rel=0.02)
    # Whatever its random draws spell, the ratio is a fraction and every answer was counted.
    assert 0.0 <= d["distinct_names"] <= 1.0 and d["names_per_answer"] >= 1


def test_more_shots_than_fit_are_said_and_counted(tiny_model, chat, capsys):
    result = evaluate_task(tiny_model, chat, get_task("compare_decimals"), "test", n=3, shots=10_000, mode="chat",
                           show_progress=False)
    out = " ".join(capsys.readouterr().err.split())  # the console's lines, unwrapped
    pool = len(get_task("compare_decimals").examples("train"))
    assert f"10000 shots asked, its train split holds {pool}" in out and result.shots == pool
    assert result.fewer_shots == 3 and "prompts fit the model's 128-token context only with fewer shots" in out


def test_copy_probes_need_only_copying():
    probes = copy_probes(n=20, seed=3)
    assert probes == copy_probes(n=20, seed=3) and probes != copy_probes(n=20, seed=4)
    for (p_expr, typed), (p_result, result) in zip(probes["expression"], probes["result"]):
        question = p_expr.splitlines()[-1].removesuffix(": type")
        assert typed == question.replace(" ", "").replace("×", "*")  # the line's own sum, retyped
        assert p_result.startswith(p_expr) and f"shows {result}, so {question} =" in p_result
    for prompt, word in probes["list"]:
        listed, again = prompt.removeprefix("List: ").split("\nAgain: ")
        words, shown = listed.split(", "), again.removesuffix(",").split(", ")
        assert words[:len(shown)] == shown and words[len(shown)] == word  # the word after the repeated part


def test_copying_scores_a_model(tiny_model, tokenizer, chat):
    assert copying(tiny_model, chat, n=4) == {"expression": 0.0, "result": 0.0, "list": 0.0}  # untrained: no copying
