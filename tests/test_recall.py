"""The recall lab: the logit lens and the attention knockout on hand-built cases whose answers are known,
the fact prompts, the experiment end to end on a tiny run, and the real SmolLM2 on real-world facts."""

import argparse
import json
import math

import pytest
import torch

from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.common import PocketError
from pocketgpt.data.world import ATTRIBUTE, WorldConfig, generate_world
from pocketgpt.lab import recall
from pocketgpt.lab.recall import EncodedFact, FactPrompt, encode_fact, knockout_drops, lens_logits, rank_and_prob
from pocketgpt.model import GPT, GPTConfig

# ----------------------------------------------------------------------------- ranks and probabilities


def test_rank_counts_strictly_better_tokens_and_prob_is_the_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 5.0, 0.0]])
    ranks, probs = rank_and_prob(logits, 2)
    assert ranks == [2, 0]  # two tokens above it; then the top
    z = math.exp(1) + 2 * math.exp(3) + math.exp(2)
    assert probs[0] == pytest.approx(math.exp(2) / z)
    assert probs[1] == pytest.approx(math.exp(5) / (math.exp(5) + 3))
    ranks, _ = rank_and_prob(logits, 1)
    assert ranks == [0, 1]  # a tie with the best is still rank 0; then one token above it


def test_lens_after_the_last_block_is_the_models_own_output(tiny_model):
    ids = [5, 17, 42, 8, 99, 3]
    lens = lens_logits(tiny_model, ids)
    assert lens.shape == (tiny_model.cfg.n_layer + 1, tiny_model.cfg.vocab_size)
    with torch.no_grad():
        own = tiny_model(torch.tensor([ids]))[0, -1]
        embedded = tiny_model.lm_head(tiny_model.model.norm(tiny_model.model.embed_tokens.weight[ids[-1]]))
    torch.testing.assert_close(lens[-1], own)
    torch.testing.assert_close(lens[0], embedded)  # layer 0 reads the last token's embedding


# ----------------------------------------------------------------------------- a hand-built model


def copying_model() -> GPT:
    """One block, weights set by hand: token 5 carries the answer (token 7), and only attention can move it.

    Embeddings and unembedding are the identity (token i <-> dimension i). Queries and keys are zero,
    so every position attends uniformly to what it may see; the value map copies dimension 5 into
    dimension 7; the MLP is off. The last position therefore predicts 7 exactly when it sees a 5.
    """
    cfg = GPTConfig(vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, d_model=8, max_seq_len=16, tie_embeddings=False)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(8))
        model.lm_head.weight.copy_(torch.eye(8))
        model.model.layers[0].self_attn.v_proj.weight[7, 5] = 10.0
        model.model.layers[0].self_attn.o_proj.weight.copy_(torch.eye(8))
    return model


def test_lens_on_the_hand_built_model():
    ranks, probs = rank_and_prob(lens_logits(copying_model(), [1, 5, 3, 2]), 7)
    assert ranks == [1, 0]  # the embedding predicts the last token itself (2); after the block, the answer
    assert probs[1] > 0.5 > probs[0]


def test_knockout_of_the_position_that_carries_the_answer_removes_it():
    model = copying_model()
    fact = EncodedFact(ids=[1, 5, 3, 2], subject=[1], relation=[2], answer=7)
    drops = knockout_drops(model, fact, window=1)
    assert drops["subject"][0] > 0.9  # without the 5 in view, 7 falls back to a uniform guess
    assert drops["relation"][0] < 0  # one distraction less: the 5 gets more of the attention
    # The same cut written by hand: the last position may not see position 1.
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    mask[0, 0, 3, 1] = False
    with torch.no_grad():
        cut = model.lm_head(model.hidden_states(torch.tensor([fact.ids]), attn_masks={0: mask})[:, -1])
    intact = lens_logits(model, fact.ids)[-1]
    _, (p_cut,) = rank_and_prob(cut, 7)
    _, (p_intact,) = rank_and_prob(intact, 7)
    assert drops["subject"][0] == pytest.approx(1 - p_cut / p_intact)


def test_a_causal_mask_passed_explicitly_changes_nothing(tiny_model):
    ids = torch.randint(0, 512, (2, 9))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    with torch.no_grad():
        masked = tiny_model.hidden_states(ids, attn_masks={0: causal, 1: causal})
        plain = tiny_model.hidden_states(ids)
    torch.testing.assert_close(masked, plain)
    with pytest.raises(PocketError, match="not with a cache"):
        tiny_model.hidden_states(ids, cache=tiny_model.make_cache(2), attn_masks={0: causal})


def test_knockout_windows_are_centred_and_clipped():
    assert list(recall.window_layers(0, 1, 6)) == [0]
    assert list(recall.window_layers(3, 3, 6)) == [2, 3, 4]
    assert list(recall.window_layers(0, 5, 6)) == [0, 1, 2]
    assert list(recall.window_layers(5, 5, 6)) == [3, 4, 5]
    assert list(recall.window_layers(2, 2, 6)) == [2, 3]


# ----------------------------------------------------------------------------- fact prompts


def test_world_prompts_stop_right_before_the_value():
    world = generate_world(WorldConfig(seed=3))
    prompts = recall.world_prompts(world, n=5)
    assert [p.group for p in prompts] == ["head"] * 5 + ["tail"] * 5 + ["unseen"] * 5
    table = {(f.entity, f.value): f for f in world.facts}
    for p in prompts:
        fact = table[(p.subject, p.answer)]
        assert fact.tier == p.group and not ATTRIBUTE[(fact.kind, fact.attribute)].numeric
        assert p.subject in p.prompt
        statements = ATTRIBUTE[(fact.kind, fact.attribute)].statements
        assert any(s.format(e=p.subject, v=p.answer).startswith(f"{p.prompt} {p.answer}") for s in statements)
    assert recall.world_prompts(world, n=5, seed=1) != prompts  # the seed draws other facts


def test_encode_fact_finds_subject_relation_and_answer(chat):
    tok = chat.tokenizer
    fact = FactPrompt("The capital of Velmo is", "Velmo", "Python", "head")
    enc = encode_fact(chat, fact)
    assert enc.ids == chat.document_start + tok.encode(fact.prompt)
    assert tok.decode([enc.ids[i] for i in enc.subject]).strip() == "Velmo"
    assert tok.decode([enc.ids[i] for i in enc.relation]) == "The capital of"
    assert tok.decode([enc.answer]).startswith(" P")  # the answer's first token, with its leading space
    assert len(enc.ids) - 1 not in enc.subject + enc.relation  # the last position is the one that reads


def test_encode_fact_leaves_the_first_position_out_of_the_relation(hf_chat):
    fact = FactPrompt("The capital of France is", "France", "Paris", "known")
    enc = encode_fact(hf_chat, fact)  # no document-start token: "The" is the sequence's first position
    assert hf_chat.document_start == [] and 0 not in enc.relation
    assert hf_chat.tokenizer.decode([enc.ids[i] for i in enc.relation]) == " capital of"


def test_a_prompt_ending_with_its_subject_is_refused(chat):
    with pytest.raises(PocketError, match="ends with its subject"):
        encode_fact(chat, FactPrompt("The founder is Velmo", "Velmo", "Dorin", "head"))


# ----------------------------------------------------------------------------- statistics and words


def test_layer_stats_and_the_trend_in_words():
    records = [{"group": "head", "ranks": [900, 10, 0], "probs": [0.0, 0.1, 0.8],
                "knockout": {"subject": [0.1, 0.6], "relation": [0.5, 0.0]}},
               {"group": "head", "ranks": [700, 30, 0], "probs": [0.0, 0.2, 0.6],
                "knockout": {"subject": [0.3, 0.2], "relation": [0.3, 0.2]}},
               {"group": "unseen", "ranks": [800, 400, 50], "probs": [0.0, 0.0, 0.01]}]
    stats = recall.layer_stats(records)
    head = stats["groups"]["head"]
    assert head["n"] == 2 and head["median_rank"] == [800, 20, 0] and head["top1"] == [0, 0, 1]
    assert head["mean_prob"][-1] == pytest.approx(0.7)
    assert stats["groups"]["unseen"]["median_rank"] == [800, 400, 50]
    assert stats["knockout"]["n"] == 2
    assert stats["knockout"]["subject"] == pytest.approx([0.2, 0.4])
    lines = recall.describe(stats, n_layer=2, window=1, kept=None)
    assert "head facts (2): the median rank of the answer goes from 800 after the embedding to 0" in lines[0]
    assert "first reaches 0 after block 2" in lines[0] and "never reaches 0" in lines[1]
    assert "subject tokens costs most at block 2 (40%" in lines[2]
    assert "relation tokens costs most at block 1 (40%" in lines[2]


# ----------------------------------------------------------------------------- end to end


def run_lab(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    recall.add_arguments(parser)
    recall.main(parser.parse_args(list(argv)))


def test_the_experiment_on_a_tiny_run_of_ours(tmp_path, tiny_model, chat):
    save_model(tiny_model, tmp_path / "run" / "base", chat, meta={"stage": "base"})
    run_lab(str(tmp_path / "run"), "--n", "3")
    out = tmp_path / "run" / "lab" / "recall"
    result = json.loads((out / "recall.json").read_text())
    assert result["fact_set"] == "world" and result["kept"] is None
    assert {g: s["n"] for g, s in result["groups"].items()} == {"head": 3, "tail": 3, "unseen": 3}
    assert all(len(f["ranks"]) == tiny_model.cfg.n_layer + 1 for f in result["facts"])
    assert (out / "rank_by_layer.png").stat().st_size > 0
    assert "head facts (3)" in (out / "summary.md").read_text()
    assert (out / "summary.md").read_text().splitlines()[-1].startswith("Measured at ") and result["measured"]["date"]
    with pytest.raises(PocketError, match="no stage 'sft'"):
        run_lab(str(tmp_path / "run"), "--stage", "sft")
    with pytest.raises(PocketError, match="--window"):
        run_lab(str(tmp_path / "run"), "--window", "9")
    # a reward model's LM head is no model's reading of the layers: the lens ran on it without a word
    save_model(tiny_model.with_score_head(), tmp_path / "run" / "rm", chat, meta={"stage": "rm"})
    with pytest.raises(PocketError, match="reward model"):
        run_lab(str(tmp_path / "run"), "--stage", "rm")


def test_an_imported_tokenizer_gets_the_real_world_facts(tmp_path, hf_chat, hf_tokenizer):
    model = GPT(GPTConfig(vocab_size=hf_tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, d_model=16))
    save_model(model, tmp_path / "run" / "base", hf_chat, meta={"stage": "imported"})
    # A random model knows no real-world fact, and the lab says so instead of plotting nothing.
    with pytest.raises(PocketError, match=f"none of the {len(recall.REAL_FACTS)} real-world facts"):
        run_lab(str(tmp_path / "run"))


def test_smollm2_knows_most_real_world_facts_and_recalls_them_late(tmp_path, smollm2_gguf):
    from pocketgpt.interop.importer import import_model

    import_model(smollm2_gguf, tmp_path / "smollm2")
    model, chat, _ = load_model(tmp_path / "smollm2")
    ranks = []
    for fact in recall.real_prompts(len(recall.REAL_FACTS)):
        enc = encode_fact(chat, fact)
        fact_ranks, _ = rank_and_prob(lens_logits(model, enc.ids), enc.answer)
        ranks.append(fact_ranks)
    known = [r for r in ranks if r[-1] == 0]
    assert len(known) >= 0.6 * len(ranks)  # 29 of the 40 when this was written
    middle = model.cfg.n_layer // 2
    assert sorted(r[middle] for r in known)[len(known) // 2] > 100  # halfway up, the answer is still far down
