import pytest
import torch

from pocketgpt.constrain import Constraints


def test_the_mask_goes_where_the_logits_are(chat):
    """The allowed-token mask was built on the CPU and applied to logits on the model's device: on CUDA or MPS
    one constrained request raised, and the server's worker ended every reply on that model with it. The
    "meta" device stands in for a GPU (it refuses a CPU mask as they do)."""
    vocab = chat.tokenizer.vocab_size
    on_cpu = Constraints(chat, vocab).json_object().processor()([], torch.zeros(vocab))
    opening = chat.tokenizer.encode("{")
    assert on_cpu.isinf().sum() > vocab // 2 and not on_cpu[opening[0]].isinf()
    elsewhere = Constraints(chat, vocab).json_object().processor()([], torch.zeros(vocab, device="meta"))
    assert elsewhere.device.type == "meta" and elsewhere.shape == (vocab,)


def test_logprobs_are_those_of_the_distribution_a_constraint_leaves(tiny_model, chat):
    """A reply held to ["yes", "no"] reported the unconstrained model's likeliest tokens as its alternatives
    (vLLM reports the masked distribution): now only tokens the constraint allows, their probabilities summing
    to 1, the sampled token's among them."""
    import math

    from pocketgpt.engine import Engine, SamplingParams

    tok = chat.tokenizer
    engine = Engine(tiny_model, tok)
    processor = Constraints(chat, tiny_model.cfg.vocab_size).choice(["yes", "no"]).processor()
    out = engine.generate([tok.encode("The")], SamplingParams(max_tokens=8, temperature=0, logprobs=20),
                          processors=[processor])[0]
    assert out.text in ("yes", "no")
    first = out.top_logprobs[0]
    assert first and all(("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t]))) for t, _ in first)
    assert sum(math.exp(v) for _, v in first) == pytest.approx(1.0, abs=1e-4)
    assert out.logprobs[0] == pytest.approx(dict(first)[out.tokens[0]])
