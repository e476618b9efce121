"""The grokking experiment: the table and its split are pinned; a short run writes its curves, plot and summary."""

import json
from dataclasses import asdict

import pytest

from pocketgpt.cli import main
from pocketgpt.common import PocketError
from pocketgpt.lab.grokking import Settings, speedup, split_table, summary_markdown, table


def test_division_table_and_its_half_split_are_pinned():
    rows = table("div", 97)
    assert len(rows) == 97 * 96  # y = 0 has no inverse
    assert all(z * y % 97 == x for x, y, z in rows)
    train, val = split_table(rows, 0.5, seed=0)
    assert (len(train), len(val)) == (4656, 4656)
    assert sorted(train + val) == sorted(rows) and not set(train) & set(val)
    assert train == split_table(rows, 0.5, seed=0)[0]  # the same seed, the same split
    assert train != split_table(rows, 0.5, seed=1)[0]
    assert train[:3] == [(0, 1, 0), (0, 3, 0), (0, 7, 0)]  # pinned: a change of the split shows up here


def test_bad_settings_are_clear_errors():
    with pytest.raises(PocketError, match="prime"):
        table("div", 91)
    with pytest.raises(PocketError, match="unknown operation"):
        table("pow", 97)
    with pytest.raises(PocketError, match="train-frac"):
        split_table(table("add", 5), 1.0, 0)


def test_speedup_is_a_lower_bound_when_the_baseline_never_generalised():
    grokfast = {"steps_to_val_95": 500}
    assert speedup({"steps_to_val_95": 20_000, "steps": 20_000}, grokfast) == (40.0, False)
    assert speedup({"steps_to_val_95": None, "steps": 30_000}, grokfast) == (60.0, True)
    assert speedup({"steps_to_val_95": 100, "steps": 100}, {"steps_to_val_95": None}) == (None, False)


def test_a_short_run_writes_curves_plot_and_summary(tmp_path):
    # mod 5 addition: 13 of 25 equations to learn, a few hundred steps
    out = tmp_path / "grok"
    assert main(["lab", "grokking", str(out), "--operation", "add", "--prime", "5", "--train-frac", "0.5",
                 "--runs", "weight_decay,grokfast", "--steps", "60", "--eval-every", "10"]) == 0
    report = json.loads((out / "grokking.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"weight_decay", "grokfast"}
    assert runs["weight_decay"]["weight_decay"] == 1.0 and runs["weight_decay"]["settings"]["optimizer"] == "adamw"
    # Grokfast's run: the reference command's L2 term through Adam, and the filter
    assert runs["grokfast"]["weight_decay"] == 0.005 and runs["grokfast"]["settings"]["optimizer"] == "adam"
    assert [c["step"] for c in runs["weight_decay"]["curve"]][:2] == [10, 20]
    assert runs["weight_decay"]["curve"][-1]["train_acc"] == 1.0  # 13 equations memorised
    assert (out / "grokking.png").stat().st_size > 10_000
    assert "| weight_decay | adamw 1 | - |" in (out / "summary.md").read_text()
    assert "| grokfast | adam 0.005 | Grokfast (alpha 0.98, lambda 5) |" in (out / "summary.md").read_text()

    # the same command again reads the finished runs back; other settings into the same folder are refused
    assert main(["lab", "grokking", str(out), "--operation", "add", "--prime", "5", "--train-frac", "0.5",
                 "--runs", "weight_decay,grokfast", "--steps", "60", "--eval-every", "10"]) == 0
    assert json.loads((out / "grokking.json").read_text())["runs"] == report["runs"]
    assert main(["lab", "grokking", str(out), "--operation", "add", "--prime", "5", "--train-frac", "0.5",
                 "--runs", "grokfast", "--steps", "60", "--eval-every", "10", "--lr", "0.01"]) == 2
    # one run again: the folder's other finished run stays in its report (it was rewritten without it)
    assert main(["lab", "grokking", str(out), "--operation", "add", "--prime", "5", "--train-frac", "0.5",
                 "--runs", "grokfast", "--steps", "60", "--eval-every", "10"]) == 0
    assert json.loads((out / "grokking.json").read_text())["runs"] == report["runs"]
    assert "| weight_decay | adamw 1 | - |" in (out / "summary.md").read_text()


def test_summary_states_the_delay_and_the_speedups():
    curve = [{"step": 10, "train_acc": 1.0, "val_acc": 0.9}]
    s = Settings()
    runs = [{"run": "weight_decay", "weight_decay": 1.0, "steps": 4000, "steps_to_train_99": 400,
             "steps_to_val_95": 3000, "final_val_acc": 1.0, "curve": curve, "time_s": 300, "settings": asdict(s)},
            {"run": "no_weight_decay", "weight_decay": 0.0, "steps": 20000, "steps_to_train_99": 500,
             "steps_to_val_95": None, "final_val_acc": 0.3, "curve": curve, "time_s": 3000, "settings": asdict(s)},
            {"run": "grokfast", "weight_decay": 0.005, "steps": 700, "steps_to_train_99": 300,
             "steps_to_val_95": 500, "final_val_acc": 0.99, "curve": curve, "time_s": 60, "settings": asdict(s)},
            {"run": "l2_only", "weight_decay": 0.005, "steps": 4000, "steps_to_train_99": 300,
             "steps_to_val_95": 3500, "final_val_acc": 0.99, "curve": curve, "time_s": 400, "settings": asdict(s)}]
    measured = {"pocketgpt": "0.1.0", "commit": "abc123", "uncommitted_changes": False, "cpu": "CPU", "cores": 2,
                "accelerator": None, "torch": "2.13.0", "date": "2026-12-02 10:00 UTC"}
    text = summary_markdown(runs, s, measured)
    assert "Measured at commit abc123 on CPU (2 cores)" in text
    assert "7.5x later" in text
    assert "at least 40.0x sooner in steps than the run without weight decay" in text
    assert "7.0x sooner in steps than the same L2 term without the filter." in text
