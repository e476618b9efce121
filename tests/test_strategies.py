"""Strategies: the vote's arithmetic, and every strategy run against both LM backends."""

import json
import re

import pytest
from test_lm import lm, run, served  # noqa: F401  (the two backends, as fixtures)

from pocketgpt.common import PocketError
from pocketgpt.data.tasks import get_task
from pocketgpt.data.tasks.game24 import BACK, kept_moves
from pocketgpt.reason import LM
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.strategies import STRATEGIES, Settings, ask, evaluate_strategy

# Each strategy on a task it fits, with what it costs in model calls for 2 questions (tot: a search).
TASK_OF = {"direct": "compare_decimals", "cot": "compare_decimals", "self_consistency": "compare_decimals",
           "reflection": "arithmetic", "tot": "game24", "react": "arithmetic", "constrained": "structured",
           "rag": "factqa_unseen"}


def test_self_consistency_votes_over_its_samples(lm):  # noqa: F811
    task = get_task(TASK_OF["self_consistency"])
    answers = ask(lm, task, task.examples("test")[:2], "self_consistency", Settings(k=3, max_tokens=12))
    assert all(len(a.samples) == 3 and a.text in a.samples and sum(a.votes.values()) <= 3 for a in answers)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_on_both_backends(lm, strategy):  # noqa: F811
    task = get_task(TASK_OF[strategy])
    settings = Settings(shots=1, k=3, max_tokens=12, beam=2, rounds=1, max_steps=1, tools=("calculator",))
    before = lm.usage.calls
    answers = ask(lm, task, task.examples("test")[:2], strategy, settings)
    assert len(answers) == 2 and lm.usage.calls > before
    result, rows = evaluate_strategy(lm, task, strategy, n=2, settings=settings)
    assert result.n == 2 and result.calls >= 2 and 0 <= result.accuracy <= 1 and len(rows) == 2
    assert result.ci_low <= result.accuracy <= result.ci_high
    assert result.prompt_tokens > 0 and result.completion_tokens > 0


@pytest.mark.parametrize("strategy", ["cot", "self_consistency"])
def test_game24_chains_with_a_calculator_on_both_backends(lm, strategy):  # noqa: F811
    """The chain continues its own reply between the calculator's results (continue_final), locally and
    through the server, and every move is one on the table (guided choice), whatever the model."""
    task = get_task("game24")
    before = lm.usage.calls
    answers = ask(lm, task, task.examples("test")[:2], strategy, Settings(shots=1, k=2))
    assert len(answers) == 2 and lm.usage.calls > before
    chains = [t for a in answers for t in (a.samples or [a.text])]
    assert len(chains) == (4 if strategy == "self_consistency" else 2)
    for chain in chains:  # moves on the table, each with the model's verdict, then the answer (or "none")
        *lines, answer = chain.splitlines()
        assert lines and answer.startswith("Answer: "), chain
        assert all(line.startswith(BACK) or re.search(r"\(left: [\d ]+\) .*(sure|impossible)$", line) for line in lines)
        assert len(kept_moves(lines)) == 3 or answer == "Answer: none", chain


def test_constrained_json_is_always_schema_valid(lm):  # noqa: F811
    task = get_task("structured")
    result, rows = evaluate_strategy(lm, task, "constrained", n=4, settings=Settings(max_tokens=256))
    assert result.scores["schema_valid"] == 1.0 and all(r["scores"]["schema_valid"] == 1.0 for r in rows)


def test_a_vote_is_scored_against_one_of_its_samples(scripted):
    """Each voted answer keeps every sample's verdict and the vote's over the first k; the result has the
    accuracy of one sample and the curve as samples are added (the self-consistency paper's figure)."""
    task = get_task("arithmetic")
    first, second = task.examples("test")[:2]

    def reply(messages, request):  # first question: wrong, right, right; second: right, right, wrong
        right = first.answer if first.question in messages[-1]["content"] else second.answer
        pattern = [False, True, True] if first.question in messages[-1]["content"] else [True, True, False]
        return [Generation(f"Answer: {right if ok else 0}", "stop") for ok in pattern[:request.n]]

    result, rows = evaluate_strategy(scripted(reply), task, "self_consistency", n=2, settings=Settings(k=3))
    assert [r["samples_correct"] for r in rows] == [[False, True, True], [True, True, False]]
    assert [r["vote_by_k"] for r in rows] == [[False, False, True], [True, True, True]]
    assert result.accuracy == 1.0 and result.one_sample == pytest.approx(2 / 3)
    assert result.vote_curve == [0.5, 0.5, 1.0] and "one sample=66.7%" in result.line()
    greedy, rows = evaluate_strategy(scripted(reply), task, "cot", n=2)  # one reply each: no vote to score
    assert greedy.one_sample is None and greedy.vote_curve == [] and "samples_correct" not in rows[0]

    def retries(messages, request):  # a wrong greedy answer, rejected; a right sampled one, accepted
        if "Is the proposed answer right?" in messages[-1]["content"]:
            return [Generation("No" if "Answer: 0" in messages[-1]["content"] else "Yes", "stop")]
        right = first.answer if first.question in messages[-1]["content"] else second.answer
        return [Generation("Answer: 0" if request.temperature == 0 else f"Answer: {right}", "stop")]

    checked, rows = evaluate_strategy(scripted(retries), task, "reflection", n=2, settings=Settings(rounds=2))
    assert checked.accuracy == 1.0 and checked.one_sample is None and "samples_correct" not in rows[0]
    assert [len(r["trace"]) for r in rows] == [2, 2]  # two attempts each, the second accepted: not a vote


def test_self_consistency_votes_on_the_tasks_answer_key(scripted):
    """-N and N are different answers (a vote on words would merge them and keep the first reply)."""
    task = get_task("arithmetic")
    right = task.examples("test")[0].meta["answer"]  # the question evaluate_strategy asks with n=1
    assert right != 0

    def reply(messages, request):
        return [Generation(f"Answer: {a}", "stop") for a in (-right, right, right)]

    result, rows = evaluate_strategy(scripted(reply), task, "self_consistency", n=1, settings=Settings(k=3))
    assert result.accuracy == 1.0 and rows[0]["votes"] == {str(-right): 1, str(right): 2}


def test_a_finer_measure_averages_over_the_replies_it_applies_to(scripted):
    """A worked reply's "columns read right" is not diluted by a bare answer that has no columns."""
    task = get_task("arithmetic")
    first, second = task.examples("test")[:2]
    assert first.meta["kind"] == second.meta["kind"] == "column"

    def reply(messages, request):  # the first question worked out, the second answered bare
        text = task.cot(first) if first.question in messages[-1]["content"] else second.answer
        return [Generation(text, "stop")]

    result, rows = evaluate_strategy(scripted(reply), task, "cot", n=2)
    assert [r["scores"] for r in rows] == [{"columns_read_right": 1.0, "steps_true": 1.0}, {}]
    assert result.scores == {"columns_read_right": 1.0, "steps_true": 1.0} and result.accuracy == 1.0


@pytest.mark.parametrize("name", ["arithmetic", "game24"])
def test_a_direct_answer_is_given_at_once_in_the_tasks_answer_form(lm, name):  # noqa: F811
    """"direct" means no working: the reply is held to the task's answer form, a bare number or expression."""
    import re

    task = get_task(name)
    answers = ask(lm, task, task.examples("test")[:3], "direct", Settings(shots=1, max_tokens=16))
    assert all(re.fullmatch(task.answer_pattern, a.text) for a in answers)


def test_quoting_rag_answers_with_a_sentence_of_the_retrieved_passages(lm):  # noqa: F811
    from pocketgpt.rag.answer import sentences
    from pocketgpt.rag.world import world_index

    task = get_task("factqa_unseen")
    examples = task.examples("test")[:3]
    answers = ask(lm, task, examples, "rag", Settings(quote=True, passages=2))
    index = world_index()
    for e, a in zip(examples, answers):
        shown = {c.id: c for c in index.chunks}
        quotable = [s for cid in a.trace[0]["passages"] for s in sentences(shown[cid].text)]
        assert a.text in quotable  # a random tiny model too: the constraint, not the model, spells it


def test_strategies_refuse_tasks_they_do_not_fit(lm):  # noqa: F811
    with pytest.raises(PocketError, match="Game of 24"):
        ask(lm, get_task("arithmetic"), get_task("arithmetic").examples("test")[:1], "tot")
    with pytest.raises(PocketError, match="no JSON schema"):
        ask(lm, get_task("arithmetic"), get_task("arithmetic").examples("test")[:1], "constrained")
    with pytest.raises(PocketError, match="unknown tool"):
        ask(lm, get_task("arithmetic"), [], "react", Settings(tools=("telepathy",)))


def test_unknown_strategy(lm):  # noqa: F811
    with pytest.raises(PocketError, match="unknown strategy"):
        ask(lm, get_task("spell"), [], "telepathy")


def test_eval_cli_with_a_strategy(run, tmp_path, capsys):  # noqa: F811
    from pocketgpt.cli import main

    assert main(["eval", str(run), "--task", "compare_decimals", "--n", "3", "--strategy", "self_consistency",
                 "--k", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "calls=3" in capsys.readouterr().out
    saved = json.loads((tmp_path / "compare_decimals_test_self_consistency.json").read_text())
    assert saved["strategy"] == "self_consistency"
    # the settings it was measured with (a later run with other ones replaces the file)
    assert saved["settings"]["k"] == 2 and saved["model"].endswith("sft") and saved["measured"]["torch"]
    # without --out, beside the plain evaluation's files as --help says (nothing was written anywhere)
    assert main(["eval", str(run), "--task", "spell", "--n", "2", "--strategy", "direct", "--device", "cpu"]) == 0
    assert '"strategy": "direct"' in (run / "sft" / "eval" / "spell_test_direct.json").read_text()


def test_eval_cli_matrix_writes_every_cell(tmp_path, chat, capsys):
    import json

    import torch

    from pocketgpt.checkpoint import save_model
    from pocketgpt.cli import main
    from pocketgpt.model import GPT, preset
    from pocketgpt.reason.matrix import MATRIX

    torch.manual_seed(0)  # a context long enough for every cell's demos (this test tokenizer's tokens are short)
    save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size, max_seq_len=4096)), tmp_path / "run" / "sft",
               chat, {"stage": "sft"})
    assert main(["eval", str(tmp_path / "run"), "--matrix", "--n", "1", "--device", "cpu"]) == 0
    cells = json.loads((tmp_path / "run" / "sft" / "matrix" / "matrix.json").read_text())["cells"]
    assert [(c["task"], c["label"]) for c in cells] == [(c.task, c.label) for c in MATRIX]
    assert all(c["n"] == 1 and c["calls"] >= 1 for c in cells)
    assert "matrix done" in capsys.readouterr().out


def test_a_cell_the_model_cannot_take_is_skipped_with_its_reason(run, tmp_path):  # noqa: F811
    import json

    from pocketgpt.reason.matrix import Cell, run_matrix

    local = LM.load(run, device="cpu")  # a 1024-token context
    cells = [Cell("game24", "IO, 40 demos", "direct", {"shots": 40}), Cell("compare_decimals", "CoT", "cot")]
    run_matrix(local, tmp_path, n=1, cells=cells, log=lambda *a, **k: None)
    done, skipped = json.loads((tmp_path / "matrix.json").read_text())["cells"]  # the matrix's own row first
    assert "context is 1024" in skipped["error"] and done["n"] == 1
