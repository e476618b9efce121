"""Reward modelling, as in InstructGPT: rank K completions per prompt, learn a score that agrees.

    prompt -> K completions sampled from the SFT model -> a labeler ranks them
    reward model = the SFT transformer + a scalar head, read at a <|reward|> token after the completion
    loss = -mean over all K(K-1)/2 pairs of one prompt of log sigmoid(r_better - r_worse)

The labelers of the seeds are people following written instructions. Ours is the instructions in
code (`rubric_key`): a truthful answer (right, every step shown right too) beats a refusal, which
beats a wrong answer; then a finished, well-formed answer beats a cut-off one; then a reply half as
long beats a longer one. A configurable noise swaps neighbouring ranks, as human labelers disagree.
Users can bring their own comparisons instead: JSONL with {"prompt", "chosen", "rejected"} or
{"prompt", "completions", "ranking"}.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..chat import ChatTemplate
from ..checkpoint import load_model, save_model
from ..common import DistInfo, PocketError, atomic_write_json, console, iter_jsonl
from ..config import require
from ..data.tasks import TASKS
from ..data.tasks.base import truthfulness
from ..model import GPT
from .data_parallel import barrier, count_totals, gather, share, share_of_global_mean
from .loop import LoaderObjective, TrainConfig, Trainer, stage_setup
from .rl_math import pair_accuracy, pairwise_ranking_loss, ranked_pairs
from .rollout import chat_params, sample, scored_sequence, task_prompts

RM_TASKS = ["factqa", "arithmetic", "compare_decimals", "count_letter", "multihop", "spell"]


@dataclass
class RewardConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=120, batch_size=6, seq_len=256, lr=6e-4, warmup_steps=10, eval_every=60, save_every=40,
        sample_every=10**9, min_lr_frac=0.1))
    tasks: list = field(default_factory=lambda: list(RM_TASKS))
    # Data matters more than steps, and pairs are cheapest as more completions per prompt (K(K-1)/2
    # pairs for K samples). With a rubric that only read the final answer, 200 prompts x K=6 gave
    # 78.7% held-out and 150 x K=8 83.4%, sampling less; reading the working too, 90.6%.
    prompts_per_task: int = 150  # training prompts per task (each gets k completions)
    val_prompts_per_task: int = 30
    k: int = 8  # completions per prompt (InstructGPT used 4 to 9)
    temperature: float = 1.0
    max_tokens: int = 128
    compile_sampling: bool = True  # a compiled decode step (rollout.sample): faster after a one-time compile
    noise: float = 0.05  # chance that a labeler swaps two neighbouring ranks
    data: list = field(default_factory=list)  # user comparisons (JSONL), used instead of sampling when given
    seed: int = 0

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """Checked when set: val_prompts_per_task 0 reported an accuracy of nan%, a noise of 5 (a probability)
        was taken, and the rest failed only after the model was loaded."""
        require("rm", {
            "tasks": (self.tasks, (bool(self.tasks) or bool(self.data)) and all(t in TASKS for t in self.tasks),
                      f"a list of tasks of {', '.join(TASKS)} (or data files)"),
            "data": (self.data, all(isinstance(p, str) for p in self.data), "a list of file names"),
            **{name: (getattr(self, name), getattr(self, name) >= 1, "at least 1")
               for name in ("prompts_per_task", "val_prompts_per_task", "max_tokens")},
            "k": (self.k, self.k >= 2, "at least 2 (completions are ranked against each other)"),
            "temperature": (self.temperature, 0 < self.temperature < math.inf, "a number > 0 (k samples differ)"),
            "noise": (self.noise, 0 <= self.noise <= 1, "a probability, in [0, 1]"),
        })


@dataclass
class Comparison:
    """One prompt's completions (token ids, prompt included, <|reward|> appended) and their ranks (0 = best)."""
    sequences: list[list[int]]
    ranks: list[int]


def rubric_key(task, example, text: str, finished: bool, n_tokens: int) -> tuple:
    """What the labeler looks at, most important first (smaller is better): truthful < refuses <
    wrong; then well-formed; then the length, which `ranks_from_keys` judges within the group."""
    return truthfulness(task, example, text), not finished, n_tokens


def ranks_from_keys(keys: list[tuple], noise: float, rng: random.Random) -> list[int]:
    """Dense ranks (equal keys tie), then labeler noise: swap the ranks of two neighbouring levels.

    Concise counts only where a reader notices: a reply at least twice as long as the shortest one
    that is as truthful and as well-formed ranks below it; otherwise lengths tie. Ranking 12 tokens
    above 13 taught the reward model that shorter is better, and PPO then rephrased facts it knew
    into shorter sentences, some of them wrong.
    """
    shortest: dict[tuple, int] = {}
    for *level, n in keys:
        shortest[tuple(level)] = min(n, shortest.get(tuple(level), n))
    keys = [(*level, n >= 2 * shortest[tuple(level)]) for *level, n in keys]
    levels = sorted(set(keys))
    ranks = [levels.index(k) for k in keys]
    if len(levels) > 1 and rng.random() < noise:
        a = rng.randrange(len(levels) - 1)
        ranks = [a + 1 if r == a else a if r == a + 1 else r for r in ranks]
    return ranks


def sampled_comparisons(model: GPT, chat: ChatTemplate, cfg: RewardConfig, split: str, per_task: int,
                        info: DistInfo = DistInfo()) -> list[Comparison]:
    """K ranked completions for each prompt of the split. Under torchrun each process samples its
    share of the prompts and every process gets the whole list, in the order one process makes."""
    prompts = task_prompts(chat, cfg.tasks, split, per_task, cfg.seed)
    mine = share(len(prompts), info)
    params = chat_params(chat, cfg.max_tokens, cfg.temperature, n=cfg.k, seed=cfg.seed)
    outs = sample(model, chat, prompts[mine.start:mine.stop], params, dtype=cfg.train.dtype, first_index=mine.start,
                  compile=cfg.compile_sampling)
    comparisons = []
    for j, i in enumerate(mine):
        p, group = prompts[i], outs[j * cfg.k:(j + 1) * cfg.k]
        keys = [rubric_key(p.task, p.example, c.text, c.finish_reason == "stop", len(c.tokens)) for c in group]
        labeler = random.Random(f"{cfg.seed}:{split}:{i}")  # a prompt's noise does not depend on who samples it
        comparisons.append(Comparison([scored_sequence(chat, p.ids + c.tokens, model.cfg.max_seq_len) for c in group],
                                      ranks_from_keys(keys, cfg.noise, labeler)))
    return gather(comparisons, info)


def file_comparisons(path: str, chat: ChatTemplate) -> list[Comparison]:
    """{"prompt","chosen","rejected"} or {"prompt","completions","ranking"} (ranking: best first, indices)."""
    out = []
    for lineno, r in iter_jsonl(path):
        prompt = r.get("prompt") if isinstance(r, dict) else None
        if not isinstance(prompt, str):
            raise PocketError(f"{path}:{lineno}: expected a string 'prompt'")
        if {"chosen", "rejected"} & r.keys() and {"completions", "ranking"} & r.keys():
            raise PocketError(f"{path}:{lineno}: give 'chosen'/'rejected' or 'completions'/'ranking', not both")
        if "chosen" in r and "rejected" in r:
            completions, ranks = [r["chosen"], r["rejected"]], [0, 1]
        elif "completions" in r and "ranking" in r:
            completions, order = r["completions"], r["ranking"]
            if not isinstance(completions, list):  # a string was ranked character by character
                raise PocketError(f"{path}:{lineno}: 'completions' must be a list of strings")
            if (not isinstance(order, list) or not all(type(i) is int for i in order)
                    or sorted(order) != list(range(len(completions)))):
                raise PocketError(f"{path}:{lineno}: 'ranking' must be a permutation of the completion indices")
            ranks = [order.index(i) for i in range(len(completions))]
        else:
            raise PocketError(f"{path}:{lineno}: expected 'chosen'/'rejected' or 'completions'/'ranking'")
        if not all(isinstance(c, str) for c in completions):  # a TypeError when it was tokenized
            raise PocketError(f"{path}:{lineno}: every completion must be a string")
        if len(completions) < 2:  # nothing to compare: such groups made the held-out accuracy nan
            raise PocketError(f"{path}:{lineno}: {len(completions)} completion(s): a ranking needs at least two")
        ids = chat.prompt([{"role": "user", "content": prompt}])
        out.append(Comparison([ids + chat.reply(c) + chat.reward_suffix for c in completions], ranks))
    return out


class ComparisonBatches:
    """Groups of comparisons, shuffled per epoch and batched by length; rows are right-padded, the score is
    read at the last token.

    A step's rows are padded to its longest, and in batches drawn at random 61% of what the speedrun's
    reward model computed was padding (rows of 70 tokens on average, padded to 179). So each pool of
    POOL global batches of the shuffled order is sorted by length and cut into batches, which are shuffled
    again: a step's groups are alike in length, and the steps still come in random order.

    A step takes groups_per_batch groups per process from the global order and each process keeps
    its own slice, so the state (epoch, position) is global: a run resumes with any number of processes
    that take the same global batch.
    """

    POOL = 32

    def __init__(self, comparisons: list[Comparison], groups_per_batch: int, max_len: int, pad_id: int,
                 seed: int = 0, info: DistInfo = DistInfo()):
        self.comparisons = [c for c in comparisons if len(set(c.ranks)) > 1]  # all tied: nothing to learn
        if not self.comparisons:
            raise PocketError("no comparison has two different ranks: nothing for the reward model to learn")
        self.B, self.T, self.pad_id, self.seed, self.info = groups_per_batch, max_len, pad_id, seed, info
        self.epoch, self.pos = 0, 0

    def length(self, comparison: Comparison) -> int:
        """The tokens a comparison's rows are padded to, at least."""
        return max(min(len(s), self.T) for s in comparison.sequences)

    def epoch_order(self) -> list[int]:
        """The order in which this epoch takes the groups (see the class)."""
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.comparisons)))
        rng.shuffle(order)
        step = self.B * self.info.world_size
        out = []
        for start in range(0, len(order), step * self.POOL):
            pool = sorted(order[start:start + step * self.POOL], key=lambda i: self.length(self.comparisons[i]))
            batches = [pool[i:i + step] for i in range(0, len(pool), step)]
            whole = [b for b in batches if len(b) == step]  # a short last batch stays last, where it was
            rng.shuffle(whole)
            out += [i for b in whole + batches[len(whole):] for i in b]
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]

    def next_groups(self) -> list[Comparison]:
        order = self.epoch_order()
        groups = []
        while len(groups) < self.B * self.info.world_size:
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self.epoch_order()
            groups.append(self.comparisons[order[self.pos]])
            self.pos += 1
        mine = share(len(groups), self.info)
        return groups[mine.start:mine.stop]

    def tensors(self, groups: list[Comparison], device):
        """ids (N, T), index of each row's <|reward|> (N,), prompt id (N,), rank (N,)."""
        seqs = [s[-self.T:] for g in groups for s in g.sequences]  # keep the end: the completion
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in seqs])
        group = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.sequences])
        rank = torch.tensor([r for g in groups for r in g.ranks])
        return ids.to(device), last.to(device), group.to(device), rank.to(device)


def rewards_at(model: GPT, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    return model.scores(ids).gather(1, last[:, None]).squeeze(1)


class PairwiseRanking(LoaderObjective):
    """The reward model's objective on batches of ranked groups. Every process holds the same number of groups,
    so the loss (a mean over groups) averages over processes as one process's would; the accuracy pools pairs,
    which processes hold in different numbers, so each one's is weighed by its pairs."""

    def __init__(self, loader, device: torch.device, info: DistInfo = DistInfo()):
        super().__init__(loader, device)
        self.info = info

    def loss(self, model):
        groups = self.loader.next_groups()
        ids, last, group, rank = self.loader.tensors(groups, self.device)
        r = rewards_at(model, ids, last)
        pairs = ranked_pairs(group, rank).sum()
        accuracy = pair_accuracy(r.detach(), group, rank) * share_of_global_mean(pairs, self.info)
        return pairwise_ranking_loss(r, group, rank), {"pair_accuracy": float(accuracy),
                                                       "tokens": float((last + 1).sum())}  # padding left out


@torch.no_grad()
def held_out_accuracy(model: GPT, comparisons: list[Comparison], max_len: int, pad_id: int, device,
                      info: DistInfo = DistInfo()) -> dict:
    """Pairwise accuracy over all held-out pairs; each process scores its share of the groups."""
    if not any(len(set(c.ranks)) > 1 for c in comparisons):
        return {"val_pair_accuracy": float("nan")}
    batches = ComparisonBatches(comparisons, 8, max_len, pad_id)
    batches.comparisons.sort(key=batches.length)  # batched by length: less padding to compute
    mine = share(len(batches.comparisons), info)
    was_training = model.training
    model.eval()
    correct = pairs = 0.0
    for start in range(mine.start, mine.stop, 8):
        ids, last, group, rank = batches.tensors(batches.comparisons[start:min(start + 8, mine.stop)], device)
        r = rewards_at(model, ids, last)
        n = ((group[:, None] == group[None, :]) & (rank[:, None] < rank[None, :])).sum().item()
        correct += float(pair_accuracy(r, group, rank)) * n
        pairs += n
    model.train(was_training)
    correct, pairs = count_totals([correct, pairs], info, device)
    return {"val_pair_accuracy": correct / max(pairs, 1)}


def reward_model(cfg: RewardConfig, run_dir: str | Path, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    tc = cfg.train
    device, info, out_dir = stage_setup(tc, run_dir, "rm", resume)
    policy, chat, _ = load_model(run_dir / "sft", device)

    if cfg.data:
        train = [c for path in cfg.data for c in file_comparisons(path, chat)]
        random.Random(cfg.seed).shuffle(train)
        if len(train) < 2:  # the one comparison held out left "no comparison has two different ranks"
            raise PocketError(f"{', '.join(cfg.data)}: {len(train)} comparison(s); at least two are needed, as one "
                              "in ten (at least one) is held out to measure the reward model")
        n_val = max(1, len(train) // 10)
        train, val = train[n_val:], train[:n_val]
    else:
        if info.is_main:
            console.print(f"[bold]rm[/]: sampling {cfg.k} completions per prompt from the SFT model and ranking them")
        train = sampled_comparisons(policy, chat, cfg, "train", cfg.prompts_per_task, info)
        val = sampled_comparisons(policy, chat, cfg, "validation", cfg.val_prompts_per_task, info)
    useful = [c for c in train if len(set(c.ranks)) > 1]
    stats = {"train_groups": len(train), "train_groups_with_pairs": len(useful), "val_groups": len(val)}
    if info.is_main:
        atomic_write_json(out_dir / "rm_data.json", stats)
        console.print(f"rm data: {stats}")

    model = policy.with_score_head()
    del policy
    batches = ComparisonBatches(train, tc.batch_size, tc.seq_len, chat.pad_id, cfg.seed, info)

    def evaluate(m: GPT) -> dict:
        return held_out_accuracy(m, val, tc.seq_len, chat.pad_id, device, info)

    trainer = Trainer(model, PairwiseRanking(batches, device, info), tc, out_dir, "rm", run_dir / "metrics.jsonl",
                      device, info, evaluate=evaluate)
    if resume:
        trainer.resume()
    model.train()
    summary = trainer.run()
    if "val_pair_accuracy" not in summary:  # the loop evaluates after its last step, unless it stopped early
        summary.update(evaluate(model))
    summary["data"] = stats
    if info.is_main:
        save_model(model, out_dir, chat, {"stage": "rm", "train": asdict(tc), "summary": summary})
        console.print(f"rm: held-out pairwise accuracy {summary['val_pair_accuracy']:.1%} -> {out_dir}")
    barrier(info)  # the next stage reads rm/ on every process
    return summary
