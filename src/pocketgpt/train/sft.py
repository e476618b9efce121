"""Supervised fine-tuning: a base model that completes documents becomes an assistant that answers.

Same next-token loss as pretraining, on a small set of high-quality conversations, with the loss
only on what the assistant writes (the tokenizer's mask). The default conversations come from the
task suite, each task in the rendering that suits it (step by step for arithmetic, ...), plus any
user JSONL of {"messages": [...]}.

Hallucination mitigation, as Llama 3 describes it: before writing the fact-QA conversations, probe
what the base model knows — ask each question several times and compare with the fact table.
Where the model does not know the answer, the conversation teaches "I don't know." instead of the
true answer; training a model to state facts it does not know teaches it to make things up.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..chat import ChatTemplate, check_messages
from ..checkpoint import load_model, save_model
from ..common import DistInfo, PocketError, atomic_write_json, console, human, iter_jsonl
from ..config import require
from ..context import fit_shots_to_context
from ..data.tasks import Example, get_task
from ..data.tasks.factqa import REFUSAL
from ..data.tasks.practice import practice_conversations
from ..data.tasks.prompts import fewshot_text
from ..engine import Engine, SamplingParams
from ..model import GPT
from .data_parallel import barrier, gather, share, share_of_global_mean
from .loop import LoaderObjective, TrainConfig, Trainer, stage_setup
from .lora import LoRAConfig, apply_lora, merge_lora, trainable_summary

# task -> (rendering, examples from its train split; 0 = all of them). Fact QA also reads passages about
# its own world ("rag") and, as practice, about worlds nothing memorised can answer (tasks/practice.py),
# where the passages are the only way to the answer. A list of styles takes turns:
# arithmetic is shown both worked out and with the calculator, and RL finds out which one pays; the
# Game of 24 also teaches Tree of Thoughts' two roles (propose moves, value positions) beside its searching
# chains (400 more of them, drawn again: the chain's verdicts are what self-consistency needs), and "check"
# teaches the self-check that reflection asks (reason/).
DEFAULT_SFT_TASKS: dict[str, dict] = {
    "factqa": {"style": "sentence", "n": 0, "also": {"rag": 600}, "practice": 1200},
    "arithmetic": {"style": ["cot", "tool", "cot", "tool", "check"], "n": 1000},
    "compare_decimals": {"style": ["cot", "cot", "check"], "n": 300},
    "count_letter": {"style": "cot", "n": 200},
    "spell": {"style": "direct", "n": 200},
    "game24": {"style": ["cot", "propose", "value", "value"], "n": 0, "also": {"cot": 400}},
    "multihop": {"style": ["cot", "tool", "tool"], "n": 600},
    "structured": {"style": "direct", "n": 200},
    "names": {"style": "direct", "n": 100},
}


@dataclass
class SFTConfig:
    # ~4,900 conversations by default (task renderings, ToT roles, self-checks, retrieval, reading practice), each seen about
    # twice in 300 steps of 16 packed rows
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=16, seq_len=256, lr=3e-4, warmup_steps=15, eval_every=50, sample_every=50,
        save_every=50, min_lr_frac=0.0, compile=True))
    # task -> {"style", "n", "also": {style: n}, "practice": n}; a config file merges into these, `skip = true`
    # leaves a task out
    tasks: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SFT_TASKS.items()})
    data: list = field(default_factory=list)  # extra JSONL files of {"messages": [...]}
    mitigate_hallucination: bool = True
    probe_samples: int = 4  # answers sampled per fact question when probing the base model
    probe_temperature: float = 0.7
    # The model "knows" a fact when at least this share of samples is right. At 0.5, a base model pretrained
    # 2,400 steps learnt to refuse too little (hallucination on unseen entities 50.0%, reports/speedrun-amx-2400-p50/);
    # at 0.75, 28.6% with no false refusals (reports/speedrun-amx-2400/).
    probe_threshold: float = 0.75
    multi_turn_fraction: float = 0.2  # share of conversations made of two exchanges
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=0))  # r > 0: train adapters, merge at the end
    seed: int = 0

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """A task's entry that is not a table (an AttributeError when the set was built), a negative n (all
        but the last n examples), data that are not file names (a TypeError): refused when set."""
        bad = next(((name, spec) for name, spec in self.tasks.items()
                    if not isinstance(spec, dict) or type(spec.get("n", 0)) is not int or spec.get("n", 0) < 0), None)
        require("sft", {
            "tasks": (bad, bad is None, 'tables like {style = "cot", n = 100} (n >= 0)'),
            "data": (self.data, all(isinstance(p, str) for p in self.data), "a list of file names"),
            "probe_samples": (self.probe_samples, self.probe_samples >= 1, "at least 1"),
            "probe_threshold": (self.probe_threshold, 0 <= self.probe_threshold <= 1, "in [0, 1]"),
            "multi_turn_fraction": (self.multi_turn_fraction, 0 <= self.multi_turn_fraction <= 1, "in [0, 1]"),
        })


# ----------------------------------------------------------------------------- knowledge probe


@torch.no_grad()
def probe_knowledge(model: GPT, chat: ChatTemplate, task, examples, samples: int, temperature: float,
                    seed: int = 0, batch_size: int = 64, dist_info: DistInfo = DistInfo(),
                    shots: int = 3) -> tuple[list[float], int]:
    """For each fact question, the share of sampled few-shot answers that are right; and how many prompts
    held fewer than `shots` solved examples to fit the model's context.

    The questions go in chunks, each sampled with a seed of its own (seed + where it starts); under
    torchrun the chunks are dealt out to the processes and the scores gathered: the same scores."""
    engine = Engine(model, chat.tokenizer)
    build = lambda i, k: chat.document(fewshot_text(task, examples[i], shots=k))  # noqa: E731
    params = SamplingParams(max_tokens=24, temperature=temperature, n=samples,
                            stop_tokens=chat.document_stops, stop_strings=("\n",))
    prompts, fewer, _ = fit_shots_to_context(model, [build(i, shots) for i in range(len(examples))], params,
                                             build, shots)
    per_chunk = max(1, batch_size // samples)
    starts = range(0, len(prompts), per_chunk)
    mine = share(len(starts), dist_info)
    scores = []
    for start in starts[mine.start:mine.stop]:
        chunk = prompts[start:start + per_chunk]
        outs = engine.generate(chunk, replace(params, seed=seed + start))
        for i in range(len(chunk)):
            e = examples[start + i]
            truth = {**e.meta, "tier": "head"}  # judge the value itself, whatever the tier
            right = sum(task.verify(type(e)(e.question, e.answer, truth), c.text.strip())
                        for c in outs[i * samples:(i + 1) * samples])
            scores.append(right / samples)
    return gather(scores, dist_info), fewer


# ----------------------------------------------------------------------------- the conversations


def build_conversations(cfg: SFTConfig, base: GPT | None, chat: ChatTemplate,
                        dist_info: DistInfo = DistInfo()) -> tuple[list[list[dict]], dict]:
    """The SFT set: task renderings (+ probed fact QA) + user files; and statistics about it. Under
    torchrun the processes share the knowledge probe and all build the same set."""
    rng = random.Random(cfg.seed)
    convs, stats = [], {"per_task": {}}
    for name, spec in cfg.tasks.items():
        if spec.get("skip"):
            continue
        task = get_task(name)
        style = spec.get("style", "direct")
        examples = task.examples("train")
        if spec.get("n"):
            examples = examples[:spec["n"]]
        if name.startswith("factqa"):
            task_convs, probe = factqa_conversations(cfg, task, examples, base, chat, style, dist_info)
            stats["probe"] = probe
        else:
            task_convs = task.render_each(examples, style)
        for extra, count in spec.get("also", {}).items():  # more renderings of the same examples, in another style
            task_convs += task.render_each(redrawn(examples, count), extra)
        stats["per_task"][name] = len(task_convs)
        convs += task_convs
        if spec.get("practice"):  # conversations about other worlds, answered only from the context
            convs += practice_conversations(task, spec["practice"], cfg.seed)
            stats["per_task"][f"{name} (practice worlds)"] = spec["practice"]
    for path in cfg.data:
        given = len(convs)
        for lineno, r in iter_jsonl(path):
            if not isinstance(r, dict) or not isinstance(r.get("messages"), list):
                raise PocketError(f"{path}:{lineno}: no 'messages' list")
            try:
                check_messages(r["messages"])
            except PocketError as e:
                raise PocketError(f"{path}:{lineno}: {e}") from None
            if not any(m["role"] == "assistant" and (m.get("content") or m.get("tool_calls")) and m.get("weight", 1)
                       for m in r["messages"]):
                raise PocketError(f"{path}:{lineno}: no assistant reply (of weight 1), so nothing to learn")
            convs.append(r["messages"])
        if len(convs) == given:
            raise PocketError(f"{path} holds no conversations")
        stats["per_task"][str(path)] = len(convs) - given
    rng.shuffle(convs)
    # Some two-exchange conversations, so the assistant also learns to answer after earlier turns.
    n_multi = int(len(convs) * cfg.multi_turn_fraction) // 2
    merged = [convs[2 * i] + convs[2 * i + 1] for i in range(n_multi)]
    convs = merged + convs[2 * n_multi:]
    rng.shuffle(convs)
    stats["conversations"] = len(convs)
    return convs, stats


def redrawn(examples: list[Example], count: int) -> list[Example]:
    """`count` examples: the first ones, or, past the end, the same ones again as new draws (meta "draw"
    = 1, 2, ...) that a rendering with random parts (other passages, other distractors) makes differently."""
    return [replace(e, meta={**e.meta, "draw": i // len(examples)}) if i >= len(examples) else e
            for i, e in zip(range(count), itertools.cycle(examples))]


def factqa_conversations(cfg: SFTConfig, task, examples, base: GPT | None, chat: ChatTemplate,
                         style: str = "sentence", dist_info: DistInfo = DistInfo()):
    """Each fact in every phrasing, answered with a full sentence, or with "I don't know." where the
    base model does not know it (the mitigation). Without the mitigation, every fact gets its true answer.

    A refusal is taught in the fact's one sampled phrasing only: the same sentence fits every
    question, and a set that is mostly refusals teaches the model to doubt what it does know."""
    if not cfg.mitigate_hallucination or base is None:
        # The naive recipe: labelers write the true answer, known to them, not necessarily to the model.
        knows = [True] * len(examples)
        info: dict = {"mitigated": False}
    else:
        scores, fewer = probe_knowledge(base, chat, task, examples, cfg.probe_samples, cfg.probe_temperature,
                                        cfg.seed, dist_info=dist_info)
        knows = [score >= cfg.probe_threshold for score in scores]
        share = {t: [k for e, k in zip(examples, knows) if e.meta["tier"] == t] for t in ("head", "tail", "unseen")}
        info = {"mitigated": True, "known_share": {t: sum(v) / max(1, len(v)) for t, v in share.items()},
                "fewer_shots": fewer, "questions": len(examples)}
    convs = []
    for e, known in zip(examples, knows):
        # "head" renders the true sentence even for a tail/unseen fact; a refusal where the model does not know.
        as_known = Example(e.question, e.answer, {**e.meta, "tier": "head"})
        if known:
            convs += [task.render(phrasing, style) for phrasing in task.phrasings(as_known)]
        else:
            convs.append([{"role": "user", "content": e.question}, {"role": "assistant", "content": REFUSAL}])
    return convs, info


# ----------------------------------------------------------------------------- batches


class ConversationLoader:
    """Packs tokenized conversations into (B, T) rows; targets are -1 wherever the mask is 0.

    Conversations are shuffled per epoch with a seeded RNG and packed greedily; a conversation longer
    than a row is cut. The state is (epoch, position), saved with checkpoints.
    """

    def __init__(self, encoded: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if not encoded:
            raise PocketError("the SFT set is empty")
        self.encoded = [(ids[:seq_len + 1], mask[:seq_len + 1]) for ids, mask in encoded]
        self.B, self.T, self.pad_id, self.seed = batch_size, seq_len, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.encoded)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffled()

    def _next_conversation(self) -> tuple[list[int], list[int]]:
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shuffled()
        item = self.encoded[self._order[self.pos]]
        self.pos += 1
        return item

    def _row(self) -> tuple[list[int], list[int]]:
        ids, mask = [], []
        while True:
            c_ids, c_mask = self._next_conversation()
            if ids and len(ids) + len(c_ids) > self.T + 1:
                self.pos -= 1  # does not fit: it starts the next row
                break
            ids += c_ids
            mask += c_mask
            if len(ids) >= self.T + 1:
                break
        pad = self.T + 1 - len(ids)
        return ids + [self.pad_id] * pad, mask + [0] * pad

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row() for _ in range(self.B * self.world_size)][self.rank * self.B:(self.rank + 1) * self.B]
        ids = torch.tensor([r[0] for r in rows])
        mask = torch.tensor([r[1] for r in rows])
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
        return ids[:, :-1], targets


class MaskedLanguageModeling(LoaderObjective):
    """SFT's objective: cross-entropy on assistant tokens only; an all-masked batch gives 0, not NaN. Under
    torchrun every trained token of the global batch counts the same: processes whose rows hold different
    numbers of them averaged their own means before, unlike one process on the whole batch. (Micro-steps of
    grad_accum weigh the same each, as TrainConfig says.)"""

    def __init__(self, loader, device: torch.device, info: DistInfo = DistInfo()):
        super().__init__(loader, device)
        self.info = info

    def loss(self, model):
        x, y = self.loader.next_batch()
        x, y = x.to(self.device), y.to(self.device)
        n = (y != -1).sum()
        loss = model(x, targets=y, reduction="sum") / n.clamp(min=1) * share_of_global_mean(n, self.info)
        return loss, {"trained_tokens": float(n)}


# ----------------------------------------------------------------------------- the stage


def fitted(chat: ChatTemplate, conversation: list[dict], limit: int) -> tuple[tuple | None, bool]:
    """The conversation rendered (tokens, loss mask) within `limit` tokens, and whether it was cut.

    A conversation cut mid-answer teaches an answer that never ends; one cut after a finished answer is
    still a whole conversation. So a long one (a merged pair, the Game of 24's several positions) keeps
    the exchanges that fit, up to its last final answer (not a tool call, whose result would be missing);
    (None, False) when even the first does not fit."""
    encoded = chat.render(conversation)
    if len(encoded[0]) <= limit:
        return encoded, False
    answers = [i + 1 for i, m in enumerate(conversation) if m["role"] == "assistant" and not m.get("tool_calls")]
    for end in reversed(answers):
        if end < len(conversation):
            encoded = chat.render(conversation[:end])
            if len(encoded[0]) <= limit:
                return encoded, True
    return None, False


def sft(cfg: SFTConfig, run_dir: str | Path, out_name: str = "sft", resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    tc = cfg.train
    device, info, out_dir = stage_setup(tc, run_dir, out_name, resume)
    model, chat, base_cfg = load_model(run_dir / "base", device)
    model.extend_context(tc.seq_len)

    convs, stats = build_conversations(cfg, model, chat, info)
    rendered = [fitted(chat, c, tc.seq_len + 1) for c in convs]
    encoded = [e for e, _ in rendered if e is not None]
    stats["too_long"] = len(convs) - len(encoded)
    stats["shortened"] = sum(cut for e, cut in rendered if e is not None)
    if info.is_main:
        atomic_write_json(out_dir / "sft_data.json", stats)
        console.print(f"[bold]sft[/]: {stats['conversations']} conversations; "
                      + ", ".join(f"{k} {v}" for k, v in stats["per_task"].items())
                      + f"; {stats['shortened']} cut after the last exchange that fits a row, "
                      f"{stats['too_long']} longer than a row even so left out")
        if "probe" in stats and stats["probe"].get("mitigated"):
            probe = stats["probe"]
            console.print("knowledge probe (share of facts the base model knows): " + ", ".join(
                f"{t} {s:.0%}" for t, s in probe["known_share"].items()))
            if probe["fewer_shots"]:
                console.print(f"[yellow]knowledge probe: {probe['fewer_shots']} of {probe['questions']} questions fit "
                              f"the base model's {model.cfg.max_seq_len}-token context only with fewer than 3 "
                              "solved examples[/]")
    loader = ConversationLoader(encoded, tc.batch_size, tc.seq_len, chat.pad_id, cfg.seed,
                                info.rank, info.world_size)
    if cfg.lora.r:
        apply_lora(model, **asdict(cfg.lora))
    model.train()
    trainer = Trainer(model, MaskedLanguageModeling(loader, device, info), tc, out_dir, out_name,
                      run_dir / "metrics.jsonl", device, info, sample=lambda m: chat_sample(m, chat))
    if resume:
        trainer.resume()
    summary = trainer.run()
    summary.update(params=model.num_params(), data=stats)
    if cfg.lora.r:
        summary["lora"] = trainable_summary(model)
        model = merge_lora(model)
    if info.is_main:
        save_model(model, out_dir, chat, {"stage": "sft", "train": asdict(tc), "summary": summary,
                                                "mitigate_hallucination": cfg.mitigate_hallucination})
        console.print(f"sft: {summary['steps']} steps, {human(summary['tokens'])} tokens, "
                      f"final loss {summary.get('loss', float('nan')):.3f} -> {out_dir}")
    barrier(info)  # the next stage reads this one's model on every process
    return summary


def chat_sample(model: GPT, chat: ChatTemplate, question: str = "What is 12 + 30?") -> str:
    was_training = model.training
    model.eval()
    prompt = chat.prompt([{"role": "user", "content": question}])
    params = SamplingParams(max_tokens=64, temperature=0, stop_tokens=chat.stop_ids)
    text = Engine(model, chat.tokenizer).generate([prompt], params)[0].text
    model.train(was_training)
    return f"{question} -> {text}"
