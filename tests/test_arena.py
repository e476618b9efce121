"""Arena ratings: Bradley-Terry against hand-computed cases, the bootstrap's determinism, Elo,
style control, and a vote store that loses nothing under concurrent writers."""

import math
import multiprocessing
from collections import Counter

import numpy as np
import pytest

from pocketgpt.common import PocketError
from pocketgpt.evaluate.arena import Battle, VoteStore, bootstrap, bradley_terry, leaderboard, online_elo, unsettled


def test_bradley_terry_two_models_by_hand():
    # a beats b 3 times in 4: P = 3/4, so R_a - R_b = 400 log10(3) = 190.85, centred on 1000
    battles = [Battle("a", "b", "a")] * 3 + [Battle("a", "b", "b")]
    r = bradley_terry(battles)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert (r["a"] + r["b"]) / 2 == pytest.approx(1000, abs=1e-6)


def test_bradley_terry_ties_count_half_and_sides_do_not_matter():
    # one win each way plus two ties: even; and writing b's win as "b plays a and wins" changes nothing
    even = bradley_terry([Battle("a", "b", "a"), Battle("a", "b", "b"), Battle("a", "b", "tie"),
                          Battle("b", "a", "both_bad")])
    assert even["a"] == pytest.approx(even["b"], abs=1e-6)
    swapped = bradley_terry([Battle("b", "a", "a")] * 3 + [Battle("b", "a", "b")])
    assert swapped["b"] - swapped["a"] == pytest.approx(400 * math.log10(3), abs=1e-3)


def test_bradley_terry_three_models_match_the_likelihood_optimum():
    # a chain: a beats b 2:1, b beats c 2:1, a beats c 3:1; check the fit is a stationary point
    battles = ([Battle("a", "b", "a")] * 2 + [Battle("a", "b", "b")] + [Battle("b", "c", "a")] * 2
               + [Battle("b", "c", "b")] + [Battle("a", "c", "a")] * 3 + [Battle("a", "c", "b")])
    r = bradley_terry(battles)
    assert r["a"] > r["b"] > r["c"]
    for m in "abc":  # the gradient of the log-likelihood: expected wins = actual wins, per model
        expected = actual = 0.0
        for b in battles:
            if m in (b.model_a, b.model_b):
                p_a = 1 / (1 + 10 ** ((r[b.model_b] - r[b.model_a]) / 400))
                expected += p_a if m == b.model_a else 1 - p_a
                actual += (b.winner == "a") if m == b.model_a else (b.winner == "b")
        assert expected == pytest.approx(actual, abs=1e-3)


def test_bootstrap_is_deterministic_for_a_seed_and_brackets_the_fit():
    rng = np.random.default_rng(1)
    battles = [Battle("x", "y", "a" if rng.random() < 0.7 else "b") for _ in range(200)]
    one, two, other = bootstrap(battles, 50, seed=3), bootstrap(battles, 50, seed=3), bootstrap(battles, 50, seed=4)
    assert all(np.array_equal(one[m], two[m]) for m in one) and not np.array_equal(one["x"], other["x"])
    fit = bradley_terry(battles)
    assert np.percentile(one["x"], 2.5) < fit["x"] < np.percentile(one["x"], 97.5)


def test_online_elo_by_hand():
    elo = online_elo([Battle("a", "b", "a")])
    assert elo == {"a": 1002.0, "b": 998.0}  # expected 0.5, K = 4


def test_style_control_discounts_length():
    # the longer answer always wins, and "verbose" writes the longer one 8 times in 10: length explains
    # its wins, so the style-controlled gap is much smaller than the plain one
    battles = [Battle("verbose", "terse", "a", 900, 100)] * 8 + [Battle("verbose", "terse", "b", 100, 900)] * 2
    plain, styled = bradley_terry(battles), bradley_terry(battles, style=True)
    assert plain["verbose"] - plain["terse"] == pytest.approx(400 * math.log10(4), abs=1e-3)
    assert abs(styled["verbose"] - styled["terse"]) < 0.6 * (plain["verbose"] - plain["terse"])


def test_leaderboard_ranks_and_counts():
    battles = [Battle("good", "bad", "a")] * 30 + [Battle("good", "bad", "b")] * 2 + [Battle("good", "mid", "tie")] * 4
    rows = leaderboard(battles, rounds=30)
    assert [r["model"] for r in rows][0] == "good" and rows[0]["rank"] == 1
    bad = next(r for r in rows if r["model"] == "bad")
    assert bad["battles"] == 32 and bad["win_rate"] == pytest.approx(2 / 32) and bad["ci_low"] <= bad["rating"] <= bad["ci_high"]


def test_votes_that_bound_no_rating_are_said_to():
    """One vote put 2,357 points and zero-width intervals between two models: a model that never lost (or
    groups that never met) has no finite maximum-likelihood rating, whatever the numbers shown."""
    assert unsettled([Battle("a", "b", "a")]).startswith("too few votes to settle the ratings: a never lost")
    assert "a, b never lost" in unsettled([Battle("a", "b", "tie"), Battle("c", "d", "tie")])  # two groups
    assert "a never lost" in unsettled([Battle("a", "b", "a")] * 10 + [Battle("b", "c", "b"), Battle("b", "c", "a")])
    for settled in ([Battle("a", "b", "a"), Battle("a", "b", "b")], [Battle("a", "b", "both_bad")],
                    [Battle("a", "b", "a"), Battle("b", "c", "a"), Battle("c", "a", "a")]):  # a cycle bounds them
        assert unsettled(settled) is None


def test_bad_battles_are_refused():
    with pytest.raises(PocketError, match="verdict"):
        Battle("a", "b", "a wins")
    with pytest.raises(PocketError, match="two different"):
        Battle("a", "a", "tie")


def _vote_many(path, worker, count):
    store = VoteStore(path)
    for i in range(count):
        store.add(Battle(f"m{worker}", "other", "a" if i % 2 else "tie", i, 3), prompt=f"{worker}:{i}")


def test_concurrent_vote_writers_lose_nothing(tmp_path):
    path = tmp_path / "votes.db"
    VoteStore(path)
    procs = [multiprocessing.get_context("spawn").Process(target=_vote_many, args=(path, w, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    battles = VoteStore(path).battles()
    assert len(battles) == 400 and Counter(b.model_a for b in battles) == {f"m{w}": 100 for w in range(4)}


def test_a_corrupt_vote_file_gives_one_clear_error(tmp_path):
    path = tmp_path / "votes.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(PocketError, match="not a usable vote database"):
        VoteStore(path)
