"""The stages of a run, in the order a run makes them; each is a folder of the run directory.

Everything that walks a run reads this one list: the report card, `pocketgpt info`, the server's model
ids, the model `load_model(run_dir)` picks, the diversity lab. A new stage is added here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str  # its folder in the run directory, and its model id when served
    label: str  # how the report card names it
    writes_text: bool = True  # a policy that generates (the reward model scores text instead)
    ablation: bool = False  # a comparison beside the pipeline, never a run's default model
    reinforced: bool = False  # trained by RL: what "RLHF loses diversity" compares with the base model


STAGES = (
    Stage("base", "base (few-shot)"),
    Stage("sft", "SFT"),
    Stage("sft_naive", "SFT, no mitigation", ablation=True),
    Stage("rm", "reward model", writes_text=False),
    Stage("ppo", "PPO", reinforced=True),
    Stage("grpo", "GRPO", reinforced=True),
)
# The stages that generate text: evaluated on the tasks, served, compared.
POLICIES = tuple(s for s in STAGES if s.writes_text)
# The policies trained by RL.
RL_STAGES = tuple(s for s in POLICIES if s.reinforced)
# The model a run directory stands for: its most post-trained policy.
DEFAULT_ORDER = tuple(s.name for s in reversed(POLICIES) if not s.ablation)
# The run's folders that are not stages: no stage may be written into one of them.
OTHER_FOLDERS = ("tokenizer", "data", "plots", "lab", "arena")


def named_stages(run: Path) -> list[str]:
    """The run's other model folders, in name order: stages trained under a name of their own (`sft --name`),
    which every listing of a run shows after its pipeline's stages."""
    known = {s.name for s in STAGES} | set(OTHER_FOLDERS)
    return sorted(p.name for p in Path(run).iterdir() if p.is_dir() and p.name not in known
                  and ((p / "config.json").exists() or (p / "checkpoints").is_dir()))
