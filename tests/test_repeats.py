"""The repeat drills: every episode's second line says again what its first line said, in formats other
than the copying probe's, with none of the world's names."""

import re

import pytest
import torch

from pocketgpt.common import PocketError
from pocketgpt.data.repeats import FORMATS, repeat_documents, repeated_token_rows
from pocketgpt.data.tasks import default_world
from pocketgpt.evaluate.harness import copy_probes

# The words of the formats themselves; every other word of a second line is one the first line showed.
FRAME = {"has", "locker", "checked", "in", "order", "shows", "ticket", "at", "the", "gate", "later", "thanked", "for"}


def test_every_episode_repeats_what_it_showed():
    docs = repeat_documents(200, seed=0)
    assert docs == repeat_documents(200, seed=0) != repeat_documents(200, seed=1)
    kinds = set()
    for doc in docs:
        episodes = doc.split("\n\n")
        assert len(episodes) == 4
        for episode in episodes:
            first, second = episode.split("\n")
            kinds.add(next(k for k in ("Say after me", "Lockers", "Seating order", "Ticket", "for the journey")
                           if k in first))
            shown = set(re.findall(r"[a-z]+|\d+", first.lower()))
            said = re.findall(r"[a-z]+|\d+", second.lower())
            assert [w for w in said if w not in shown | FRAME] == [], episode
    assert len(kinds) == len(FORMATS)  # every format drawn


def test_no_world_names_and_not_the_probe_format():
    world = default_world()
    names = {w.lower() for e in world.entities() for w in re.findall(r"[^\W\d_]+", e.name)}
    text = "\n".join(repeat_documents(300, seed=0))
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert not names & words
    probe, _ = copy_probes(1)["list"][0]
    assert probe.startswith("List: ") and "List:" not in text and "Again:" not in text


def test_repeated_token_rows_draw_only_the_given_tokens_and_target_one_segment_back():
    tokens = torch.tensor([5, 9, 11, 40])
    inputs, targets = repeated_token_rows(6, 32, tokens, min_segment=3, max_segment=8, seed=0)
    assert inputs.shape == targets.shape == (6, 32)
    assert set(inputs.unique().tolist()) <= set(tokens.tolist())
    for row, target in zip(inputs, targets):
        known = (target != -1).nonzero().flatten()
        n = int(known[0]) + 1  # the segment's length: the first target is where the second copy starts
        assert 3 <= n <= 8 and (target[:n - 1] == -1).all()
        assert (target[n - 1:-1] == row[n:]).all() and (row[n:] == row[:-n]).all()
    assert (repeated_token_rows(6, 32, tokens, 3, 8, seed=0)[0] == inputs).all()
    assert not (repeated_token_rows(6, 32, tokens, 3, 8, seed=1)[0] == inputs).all()
    with pytest.raises(PocketError, match="segments"):
        repeated_token_rows(1, 32, tokens, min_segment=8, max_segment=40, seed=0)
