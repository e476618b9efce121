"""Shared fixtures: a small tokenizer and a tiny model, built once per test session."""

import pytest
import torch

from pocketgpt.model import GPT, preset
from pocketgpt.tokenizer import Tokenizer


def small_corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:40] + ["你好，世界！小明有3个苹果。 🙂 emoji and ünïcödé"] * 20


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(small_corpus(), vocab_size=512)


@pytest.fixture()
def tiny_model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
