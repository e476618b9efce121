"""The majority vote of self-consistency."""

from pocketgpt.data.tasks.base import last_number
from pocketgpt.reason.vote import Answer, majority, vote, vote_curve


def test_majority_vote_counts_normalised_answers():
    texts = ["steps\nAnswer: 1,234", "Answer: 99", "answer: 1234.", "no idea", "Answer: 99"]
    pick, votes = majority(texts)
    assert votes == {"1234": 2, "99": 2, "no idea": 1}
    assert pick == 0  # a tie goes to the answer given first


def test_majority_without_answers_and_with_one_winner():
    assert majority(["", "  "]) == (0, {})
    pick, votes = majority(["Answer: 7", "Answer: 8", "Answer: 8"])
    assert pick == 1 and votes == {"7": 1, "8": 2}


def test_vote_keeps_samples_and_trace():
    answer = vote(["Answer: 8", "Answer: 7", "Answer: 7"], [{"step": 1}])
    assert answer.text == "Answer: 7" and len(answer.samples) == 3 and answer.trace == [{"step": 1}]
    assert answer.voted and not Answer("Answer: 8", ["Answer: 7", "Answer: 8"]).voted  # a retry accepted: no vote
    assert vote([]).text == ""


def test_vote_curve_follows_the_vote_as_samples_are_added():
    texts = ["Answer: 7", "Answer: 8", "Answer: 8", "Answer: 7", "Answer: 7"]
    correct = [t.endswith("8") for t in texts]  # 8 is right
    # one sample (7: wrong); a tie of 7 and 8 goes to the first given (7); 8 leads; a tie again; 7 leads
    assert vote_curve(texts, correct) == [False, False, True, False, False]
    assert vote_curve(["", "Answer: 8"], [False, True]) == [False, True]  # a sample with no answer does not vote


def test_the_key_decides_which_answers_agree():
    texts = ["Answer: 5", "Answer: -5", "Answer: -5"]
    assert majority(texts) == (0, {"5": 3})  # as words, -5 is 5: all three agree
    assert majority(texts, key=last_number) == (1, {"5": 1, "-5": 2})
    assert vote(texts, key=last_number).text == "Answer: -5"
    assert vote_curve(texts, [False, True, True], key=last_number) == [False, False, True]
