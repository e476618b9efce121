"""Reward model, PPO and GRPO stages on a tiny model: the plumbing, the rubric, the data formats."""

import json
import math
import random

import pytest
import torch

from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.common import PocketError, read_jsonl
from pocketgpt.data.mixture import prepare_mixture
from pocketgpt.data.sources import SourceSpec
from pocketgpt.data.tasks import get_task
from pocketgpt.train.grpo import GRPOConfig, grpo
from pocketgpt.train.loop import TrainConfig
from pocketgpt.train.ppo import PPOConfig, ppo
from pocketgpt.train.reward import (
    ComparisonBatches,
    RewardConfig,
    file_comparisons,
    ranks_from_keys,
    reward_model,
    rubric_key,
)
from pocketgpt.train.rollout import collate, scored_sequence, task_prompts


def tiny_train(steps, **kw):
    return TrainConfig(steps=steps, batch_size=2, seq_len=128, warmup_steps=0, log_every=1, save_every=100,
                       sample_every=10**9, eval_every=100, threads=1, **kw)


def test_rubric_orders_truthful_refusal_wrong():
    task = get_task("factqa")
    head = next(e for e in task.examples("train") if e.meta["tier"] == "head")
    right = rubric_key(task, head, head.meta["value"], True, 5)
    refuse = rubric_key(task, head, "I don't know.", True, 4)
    wrong = rubric_key(task, head, "Zzyzx", True, 2)
    cut_off = rubric_key(task, head, head.meta["value"], False, 5)
    longer = rubric_key(task, head, f"It is {head.meta['value']}.", True, 9)
    assert right < longer < cut_off < refuse < wrong
    # Concise counts only when the difference shows: 12 vs 13 tokens tie, 12 vs 30 do not.
    keys = [rubric_key(task, head, head.meta["value"], True, n) for n in (12, 13, 30)]
    assert ranks_from_keys(keys, 0.0, random.Random(0)) == [0, 0, 1]
    # ... and only against a reply as truthful: a long right answer still beats a short wrong one.
    assert ranks_from_keys([wrong, rubric_key(task, head, head.meta["value"], True, 30)], 0.0, random.Random(0)) == [1, 0]


def test_rubric_counts_a_lucky_guess_as_wrong():
    task = get_task("count_letter")
    example = task.examples("train")[0]
    worked = task.cot(example)
    lucky = worked.replace(example.meta["word"][0], "#", 1)  # a misspelled word, the same answer
    assert task.verify(example, lucky)
    assert rubric_key(task, example, worked, True, 20) < rubric_key(task, example, "I don't know.", True, 4)
    assert rubric_key(task, example, lucky, True, 20)[0] == rubric_key(task, example, "Answer: 99", True, 4)[0]


def test_ranks_tie_and_noise():
    keys = [(0, False, 5), (2, False, 1), (0, False, 5), (1, False, 3)]
    assert ranks_from_keys(keys, 0.0, random.Random(0)) == [0, 2, 0, 1]
    swapped = [ranks_from_keys(keys, 1.0, random.Random(s)) for s in range(20)]
    assert all(set(r) == {0, 1, 2} and r[0] == r[2] for r in swapped)  # ties stay tied
    assert all(r != [0, 2, 0, 1] for r in swapped)  # noise=1: two neighbouring levels always swap


def test_user_comparisons_file(tokenizer, chat, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n" +
                    json.dumps({"prompt": "hi", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}) + "\n")
    comps = file_comparisons(str(path), chat)
    assert comps[0].ranks == [0, 1] and comps[1].ranks == [1, 2, 0]
    assert all(s[-1] == chat.reward_suffix[-1] for c in comps for s in c.sequences)
    path.write_text(json.dumps({"prompt": "x", "completions": ["a"], "ranking": [3]}) + "\n")
    with pytest.raises(PocketError, match=r"prefs.jsonl:1: 'ranking' must be a permutation"):
        file_comparisons(str(path), chat)
    path.write_text("\n" + json.dumps(["not", "a", "record"]) + "\n")  # the file's line, blank lines counted
    with pytest.raises(PocketError, match=r"prefs.jsonl:2: expected a string 'prompt'"):
        file_comparisons(str(path), chat)
    # TypeError tracebacks, or a string ranked character by character, before
    for record, message in (({"chosen": 5, "rejected": "x"}, "every completion must be a string"),
                            ({"completions": ["a", None], "ranking": [1, 0]}, "every completion must be a string"),
                            ({"completions": ["a", "b"], "ranking": 1}, "'ranking' must be a permutation"),
                            ({"completions": "abc", "ranking": [2, 0, 1]}, "'completions' must be a list"),
                            # nothing to compare: a held-out accuracy of nan%
                            ({"completions": [], "ranking": []}, "0 completion\\(s\\): a ranking needs at least two"),
                            ({"completions": ["a"], "ranking": [0]}, "1 completion"),
                            # one of the two forms was read and the other ignored
                            ({"chosen": "a", "rejected": "b", "completions": ["b", "a"], "ranking": [1, 0]},
                             "give 'chosen'/'rejected' or 'completions'/'ranking', not both")):
        path.write_text(json.dumps({"prompt": "x", **record}) + "\n")
        with pytest.raises(PocketError, match=f"prefs.jsonl:1: {message}"):
            file_comparisons(str(path), chat)
    ten = [f"answer {i}" for i in range(12)]  # two-digit indices are ranked as numbers
    path.write_text(json.dumps({"prompt": "x", "completions": ten, "ranking": list(range(11, -1, -1))}) + "\n")
    assert file_comparisons(str(path), chat)[0].ranks == list(range(11, -1, -1))


def test_comparison_batches_read_the_reward_token(tokenizer):
    from pocketgpt.train.reward import Comparison

    comps = [Comparison([[1, 2, 3, 9], [1, 2, 9]], [0, 1]), Comparison([[4, 9], [4, 5, 9]], [1, 1])]
    batches = ComparisonBatches(comps, 1, 16, pad_id=0)
    assert len(batches.comparisons) == 1  # the all-tied group teaches nothing and is dropped
    ids, last, group, rank = batches.tensors(batches.next_groups(), "cpu")
    assert ids[torch.arange(2), last].tolist() == [9, 9] and rank.tolist() == [0, 1]


def test_comparison_batches_group_alike_lengths_and_visit_each_group_once_an_epoch():
    from pocketgpt.train.reward import Comparison

    lengths = list(range(2, 66))
    random.Random(0).shuffle(lengths)
    comps = [Comparison([[1] * (n - 1) + [9], [2, 9]], [0, 1]) for n in lengths]
    batches = ComparisonBatches(comps, 4, 128, pad_id=0)  # 64 groups: one pool of 16 batches
    steps = [[max(len(s) for s in c.sequences) for c in batches.next_groups()] for _ in range(16)]
    assert sorted(n for step in steps for n in step) == list(range(2, 66))  # every group once
    assert all(max(step) - min(step) == 3 for step in steps)  # four neighbours in length
    assert [min(step) for step in steps] != sorted(min(step) for step in steps)  # in random order
    assert batches.epoch == 0 and batches.next_groups() and batches.epoch == 1


def test_the_reward_models_step_counts_the_tokens_it_scored_not_the_padding(tiny_model):
    from pocketgpt.train.reward import Comparison, PairwiseRanking

    comps = [Comparison([[1] * 30 + [9], [1] * 5 + [9]], [0, 1]), Comparison([[4] * 10 + [9], [4, 9]], [1, 0])]
    objective = PairwiseRanking(ComparisonBatches(comps, 2, 64, pad_id=0), "cpu")
    _, metrics = objective.loss(tiny_model.with_score_head())
    assert metrics["tokens"] == 31 + 6 + 11 + 2  # of 4 rows padded to 31: 124


def test_a_sequence_that_fills_the_context_still_gets_its_reward_read_out(chat):
    full = list(range(10, 74))  # a conversation that filled a 64-token context
    scored = scored_sequence(chat, full, 64)
    assert len(scored) == 64 and scored[-len(chat.reward_suffix):] == chat.reward_suffix and scored[:10] == full[:10]
    assert scored_sequence(chat, full[:20], 64) == full[:20] + chat.reward_suffix


def test_collate_masks_exactly_the_completion():
    ids, mask = collate([[5, 6, 7, 8], [5, 6, 9]], [2, 2], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]]
    # mask[:, t] marks ids[:, t+1] as a chosen token: 7, 8 in row 0; 9 in row 1
    assert mask.tolist() == [[0, 1, 1], [0, 1, 0]]


def test_a_reward_model_learns_the_preferences_it_is_given(tiny_model, chat, tmp_path):
    """Comparisons from a file where the chosen reply always agrees: after a few steps the reward model
    scores agreement above refusal, on held-out pairs and on prompts it never saw."""
    from pocketgpt.train.reward import Comparison, rewards_at

    save_model(tiny_model, tmp_path / "sft", chat, {"stage": "sft"})
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Question {i}: shall we?", "chosen": "Yes, gladly.",
                                         "rejected": "No."}) + "\n" for i in range(20)))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "shall we?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    with pytest.raises(PocketError, match="one.jsonl: 1 comparison\\(s\\); at least two are needed"):
        reward_model(RewardConfig(train=tiny_train(8), data=[str(one)]), tmp_path)  # "no comparison has two ranks"
    cfg = RewardConfig(train=tiny_train(8), data=[str(prefs)])
    summary = reward_model(cfg, tmp_path)
    assert summary["data"] == {"train_groups": 18, "train_groups_with_pairs": 18, "val_groups": 2}
    assert summary["val_pair_accuracy"] == 1.0
    rm, _, _ = load_model(tmp_path / "rm")
    unseen = chat.prompt([{"role": "user", "content": "Question 99: shall we?"}])
    pair = Comparison([unseen + chat.reply(reply) + chat.reward_suffix for reply in ("Yes, gladly.", "No.")], [0, 1])
    ids, last, _, _ = ComparisonBatches([pair], 1, 128, chat.pad_id).tensors([pair], "cpu")
    chosen, rejected = rewards_at(rm, ids, last).tolist()
    assert chosen > rejected


def test_reward_ppo_grpo_end_to_end(tiny_model, chat, tmp_path):
    save_model(tiny_model, tmp_path / "sft", chat, {"stage": "sft"})
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"pretraining text {i}. " * 20}) + "\n"
                                                 for i in range(10)))
    prepare_mixture([SourceSpec("text", "jsonl", path=str(tmp_path / "text.jsonl"))], chat,
                    tmp_path / "data", val_fraction=0.2)  # what PPO-ptx mixes in
    rm_cfg = RewardConfig(train=tiny_train(3), tasks=["compare_decimals", "factqa"], prompts_per_task=4,
                          val_prompts_per_task=2, k=4, max_tokens=48)
    rm_summary = reward_model(rm_cfg, tmp_path)
    rm, _, meta = load_model(tmp_path / "rm")
    assert rm.cfg.score_head and meta["meta"]["stage"] == "rm" and rm_summary["steps"] == 3
    assert rm_summary["data"]["train_groups"] == 2 * 4  # prompts_per_task for each of the two tasks

    ppo_cfg = PPOConfig(train=tiny_train(4, lr=1e-4, schedule="constant"), tasks=["compare_decimals"],
                        prompts_per_task=8, rollout_size=4, ppo_epochs=2, max_tokens=10, eval_prompts_per_task=3,
                        ptx_batch_size=2, ptx_seq_len=32)
    summary = ppo(ppo_cfg, tmp_path)
    assert summary["steps"] == 4
    # Before any update the policy is the reference: no KL at all; after, the policy has moved.
    assert summary["before"]["heldout_kl"] == 0.0 and summary["after"]["heldout_kl"] > 0  # k3: never below 0
    policy, _, _ = load_model(tmp_path / "ppo")
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), tiny_model.parameters()))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ppo_records = [r for r in records if r["stage"] == "ppo" and "clipfrac" in r]
    assert len(ppo_records) == 4 and all(0 <= r["clipfrac"] <= 1 for r in ppo_records)
    # One rollout feeds 2 epochs x 2 minibatches: the first update is on-policy (ratio 1: nothing clipped).
    assert ppo_records[0]["clipfrac"] == 0.0
    # PPO-ptx's pretraining loss is a per-token mean in nats: about log(vocab) for an untrained model.
    assert ppo_records[0]["ptx_loss"] == pytest.approx(math.log(chat.tokenizer.vocab_size), rel=0.05)
    # A step trains on its minibatch's 2 rows, prompt and reply without padding, and PPO-ptx's 2 x 32 tokens.
    prompt_lens = [len(p.ids) for p in task_prompts(chat, ppo_cfg.tasks, "train", 8, ppo_cfg.seed)]
    assert all(64 + 2 * min(prompt_lens) < r["tokens"] <= 64 + 2 * (max(prompt_lens) + 10) for r in ppo_records)

    grpo_cfg = GRPOConfig(train=tiny_train(2, lr=1e-4, schedule="constant"), tasks=["compare_decimals"],
                          prompts_per_task=6, prompts_per_step=2, group_size=3, max_tokens=10, eval_n=4, beta=0.1)
    summary = grpo(grpo_cfg, tmp_path)
    assert summary["steps"] == 2 and "compare_decimals_accuracy" in summary["after"]
    assert load_model(tmp_path)[2]["meta"]["stage"] == "grpo"  # the run resolves to its newest stage
    grpo_records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["stage"] == "grpo" and "reward" in r]
    # No answer of the untrained model is right: every group ties, no advantage, nothing to reinforce.
    assert [r["reward"] for r in grpo_records] == [0.0, 0.0]
    assert grpo_records[0]["loss"] == 0.0  # and at the first step the policy is the reference: no KL either
    # Trained on 2 prompts x 3 replies; forward only: sampling them (each prompt once), then the reference's
    # log-probs (the old ones are the trained forward's own: one update per batch).
    prompt_lens = [len(p.ids) for p in task_prompts(chat, grpo_cfg.tasks, "train", 6, grpo_cfg.seed)]
    assert all(6 * min(prompt_lens) < r["tokens"] <= 6 * (max(prompt_lens) + 10) for r in grpo_records)
    assert all(r["tokens"] < r["forward_tokens"] < 2 * r["tokens"] for r in grpo_records)
    # Each finished stage keeps its final model only.
    assert not any((tmp_path / stage / "checkpoints").exists() for stage in ("rm", "ppo", "grpo"))


def test_compiled_sampling_follows_the_weights_as_they_train(tiny_model, chat):
    """RL samples with a compiled decode step that reads the weights as inputs: after an update it answers
    as the eager model with the new weights does, without compiling again."""
    from torch._dynamo.utils import counters

    from pocketgpt.train.rollout import chat_params, sample, task_prompts

    prompts = task_prompts(chat, ["compare_decimals"], "train", 6)
    params = chat_params(chat, 12, temperature=0.0)

    def answers(compile: bool) -> list[list[int]]:
        return [c.tokens for c in sample(tiny_model, chat, prompts, params, dtype="float32", compile=compile)]

    before = answers(compile=True)
    assert before == answers(compile=False)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():  # an update's worth of change
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = answers(compile=True)
    assert after == answers(compile=False) and after != before
    assert counters["stats"]["unique_graphs"] == graphs  # the update compiled nothing new
