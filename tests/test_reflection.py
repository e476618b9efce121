"""Reflection: retries after the model's own "no", the first accepted answer, the vote when none is."""

from conftest import ScriptedLM

from pocketgpt.data.tasks import get_task
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.reflection import accepts, reflection


def test_accepts_reads_the_first_yes_or_no():
    assert accepts("Yes.") and accepts("yes, it is") and not accepts("No, yes") and not accepts("maybe")


def model(attempts, verdicts):
    """Replies in turn from `attempts`; the self-check says the next of `verdicts`."""
    attempts, verdicts = iter(attempts), iter(verdicts)

    def reply(messages, request):
        if "Is the proposed answer right?" in messages[-1]["content"]:
            return [Generation(next(verdicts), "stop")]
        return [Generation(next(attempts), "stop")]
    return reply


def test_a_rejected_answer_is_retried_and_the_accepted_one_kept():
    task = get_task("arithmetic")
    example = task.examples("test")[0]
    lm = ScriptedLM(model(["Answer: 0", f"Answer: {example.answer}"], ["no", "yes"]))
    [answer] = reflection(lm, task, [example], rounds=2)
    assert task.verify(example, answer.text) and [t["accepted"] for t in answer.trace] == [False, True]
    first, retry = [r for r in lm.requests if "Is the proposed" not in r.messages[-1]["content"]]
    assert first.temperature == 0 and retry.temperature > 0 and retry.seed is not None
    check = [r for r in lm.requests if "Is the proposed" in r.messages[-1]["content"]][0]
    assert "Answer: 0" in check.messages[-1]["content"] and example.question in check.messages[-1]["content"]


def test_when_nothing_is_accepted_the_majority_wins():
    task = get_task("arithmetic")
    example = task.examples("test")[0]
    lm = ScriptedLM(model(["Answer: 5", "Answer: 7", "Answer: 7"], ["no", "no", "no"]))
    [answer] = reflection(lm, task, [example], rounds=2)
    assert answer.text == "Answer: 7" and answer.votes == {"5": 1, "7": 2} and len(answer.trace) == 3


def test_a_check_that_outgrows_the_context_accepts_nothing_instead_of_ending_the_evaluation():
    """The check quotes the reply: a long reply made its prompt too long for the model, and the whole
    evaluation stopped ("request 0: the prompt has 1437 tokens; the context is 128")."""
    from pocketgpt.reason.lm import Refused

    task = get_task("arithmetic")
    examples = task.examples("test")[:2]
    attempts = iter(["Answer: 0 " + "and so on " * 200, f"Answer: {examples[1].answer}", f"Answer: {examples[0].answer}"])

    def reply(messages, request):
        if "Is the proposed answer right?" not in messages[-1]["content"]:
            return [Generation(next(attempts), "stop")]
        if "and so on" in messages[-1]["content"]:
            raise Refused("request 0: the prompt has 1437 tokens; the context is 128")
        return [Generation("yes", "stop")]

    long_one, short_one = reflection(ScriptedLM(reply), task, examples, rounds=2)
    assert [(t["check"], t["accepted"]) for t in long_one.trace] == [("", False), ("yes", True)]
    assert task.verify(examples[0], long_one.text) and task.verify(examples[1], short_one.text)
