"""Strategies: the vote's arithmetic, and every strategy run against both LM backends."""

import pytest
from test_lm import lm, run, served  # noqa: F401  (the two backends, as fixtures)

from pocketgpt.common import PocketError
from pocketgpt.data.tasks import get_task
from pocketgpt.reason.strategies import STRATEGIES, ask, evaluate_strategy, majority


def test_majority_vote_counts_normalised_answers():
    texts = ["steps\nAnswer: 1,234", "Answer: 99", "answer: 1234.", "no idea", "Answer: 99"]
    pick, votes = majority(texts)
    assert votes == {"1234": 2, "99": 2, "no idea": 1}
    assert pick == 0  # a tie goes to the answer given first


def test_majority_without_answers_and_with_one_winner():
    assert majority(["", "  "]) == (0, {})
    pick, votes = majority(["Answer: 7", "Answer: 8", "Answer: 8"])
    assert pick == 1 and votes == {"7": 1, "8": 2}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_on_both_backends(lm, strategy):  # noqa: F811
    task = get_task("compare_decimals")
    examples = task.examples("test")[:3]
    before = lm.usage.calls
    answers = ask(lm, task, examples, strategy, shots=1, k=3, max_tokens=12)
    assert len(answers) == 3
    k = 3 if strategy == "self_consistency" else 1
    assert all(len(a.samples) == k for a in answers) and lm.usage.calls == before + 3
    if strategy == "self_consistency":
        assert all(a.text in a.samples and sum(a.votes.values()) <= 3 for a in answers)
    result, rows = evaluate_strategy(lm, task, strategy, n=3, k=3, max_tokens=12)
    assert result.n == 3 and result.calls == 3 and 0 <= result.accuracy <= 1 and len(rows) == 3
    assert result.ci_low <= result.accuracy <= result.ci_high


def test_unknown_strategy(lm):  # noqa: F811
    with pytest.raises(PocketError, match="unknown strategy"):
        ask(lm, get_task("spell"), [], "telepathy")


def test_eval_cli_with_a_strategy(run, tmp_path, capsys):  # noqa: F811
    from pocketgpt.cli import main

    assert main(["eval", str(run), "--task", "compare_decimals", "--n", "3", "--strategy", "self_consistency",
                 "--k", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "calls=3" in capsys.readouterr().out
    saved = (tmp_path / "compare_decimals_test_self_consistency.json").read_text()
    assert '"strategy": "self_consistency"' in saved
