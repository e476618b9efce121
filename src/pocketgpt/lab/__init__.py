"""The lab: the seeds' scientific stories, each reproduced by one command and a plot.

    pocketgpt lab grokking  OUT      modular division: memorise first, generalise much later (+ Grokfast)
    pocketgpt lab scaling   OUT      a ladder of model sizes: loss power law, abilities that emerge
    pocketgpt lab recall    RUN      logit lens + attention knockout: where a fact is recalled
    pocketgpt lab diversity RUN      what SFT and RL do to the diversity of samples
    pocketgpt lab induction OUT      copying from the context: a plateau with plain keys, none with smeared ones

Each experiment is a module here with `add_arguments(parser)` and `main(args)`; it writes its plots
(`*.png`), its numbers (`*.json`) and a short `summary.md` into its output directory. An experiment
that trains uses the shared `train.loop.Trainer` with a small objective, not a trainer of its own.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ..common import PocketError

# name -> (module, one-line help); modules are imported only when their command runs
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "grokking": ("pocketgpt.lab.grokking", "modular arithmetic: delayed generalisation, with and without Grokfast"),
    "scaling": ("pocketgpt.lab.scaling", "a ladder of model sizes: loss against compute, abilities against size"),
    "recall": ("pocketgpt.lab.recall", "logit lens and attention knockout on fact prompts, layer by layer"),
    "diversity": ("pocketgpt.lab.diversity", "sample diversity of base, SFT, PPO and GRPO on name generation"),
    "induction": ("pocketgpt.lab.induction", "repeated random tokens: when copying from the context is learnt"),
}


def experiment(name: str) -> ModuleType:
    return importlib.import_module(EXPERIMENTS[name][0])


def pyplot():
    """matplotlib's pyplot on the Agg backend: experiments write image files, they never open a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def finished_run(out: Path, name: str, settings: dict) -> dict | None:
    """A training run's result.json, if the run finished (the same command run again reads it back); a
    PocketError if it was run with other settings, so that one folder never mixes two experiments."""
    path = out / name / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result["settings"] != settings:
        raise PocketError(f"{out / name} was run with other settings ({result['settings']}): "
                          f"choose another output directory or delete it")
    return result


def publish(out: Path, name: str, data: dict, plot: Callable[[Path], Path], summary: Callable[[dict], str]) -> str:
    """An experiment's outputs: OUT/NAME.json (data plus where it was measured), OUT/NAME.png and summary.md.
    `summary(measured)` writes the summary's text, which is returned."""
    from ..common import atomic_write_json, atomic_write_text, provenance

    measured = provenance()
    atomic_write_json(out / f"{name}.json", {**data, "measured": measured})
    plot(out / f"{name}.png")
    text = summary(measured)
    atomic_write_text(out / "summary.md", text)
    return text
