import json

import pytest

from pocketgpt.common import PocketError
from pocketgpt.evaluate.report import diversity_reading, publish_report, stage_rows, write_report


def test_stage_rows_show_speed_and_mfu(tmp_path):
    """A stage's row carries the median step's tokens/s and the MFU against the peak measured in its run;
    a stage trained before MFU and the dtype were recorded shows its speed alone."""
    summaries = {"base": {"time_s": 300.0, "steps": 1000, "tokens": 4_096_000, "tokens_per_s": 11_820.0,
                          "mfu": 0.54, "peak_flops": 859e9, "loss": 1.15, "dtype": "bfloat16"},
                 "sft": {"time_s": 100.0, "steps": 300, "tokens": 1_228_800, "tokens_per_s": 7_300.0, "loss": 0.44}}
    for stage, summary in summaries.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text(json.dumps({"meta": {"summary": summary}}))
    rows = {row[0]: row for row in stage_rows(tmp_path)}
    assert rows["base"][1:5] == ["300s", "1000", "4.1M", "11.8K tok/s in bfloat16, MFU 54% of 859 GFLOP/s"]
    assert rows["sft"][4] == "7.3K tok/s"
    assert rows["base"][5] == "loss 1.150"
    # a stage still training was left out of the card without a word
    (tmp_path / "rm" / "checkpoints" / "step_0000040").mkdir(parents=True)
    assert {row[0]: row for row in stage_rows(tmp_path)}["rm"][2:] == ["40", "", "", "not finished: a training "
                                                                       "checkpoint, no model yet"]


def test_publish_copies_the_card_its_images_timings_and_matrices(tmp_path):
    """A published card is self-contained: every image it shows, the speedrun's timings and its strategy
    matrices sit beside it."""
    run, dest = tmp_path / "run", tmp_path / "reports" / "speedrun"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"stage": "pretrain", "step": s, "loss": 5.0 / s}) + "\n"
                                               for s in (1, 2, 3)))
    (run / "speedrun.json").write_text(json.dumps({"stage_seconds": {"pretrain": 60.0}, "total_seconds": 60.0}))
    matrices = {}
    for stage in ("sft", "grpo"):
        (run / stage / "matrix").mkdir(parents=True)
        matrices[stage] = json.dumps({"split": "test", "cells": [], "comparisons": [], "model": stage})
        (run / stage / "matrix" / "matrix.json").write_text(matrices[stage])
    (run / "lab" / "diversity").mkdir(parents=True)  # the lab's section of the card, which points at its definitions
    (run / "lab" / "diversity" / "card.md").write_text("## Diversity over seeds\n(definitions: lab/diversity/summary.md)\n")
    (run / "lab" / "diversity" / "summary.md").write_text("# definitions\n")
    card = publish_report(run, dest)
    text = card.read_text()
    assert (dest / "lab" / "diversity" / "summary.md").read_text() == "# definitions\n"  # linked, never copied
    assert "Speedrun wall time: **1.0 min**" in text
    assert "![loss](plots/loss.png)" in text
    assert (dest / "plots" / "loss.png").read_bytes() == (run / "plots" / "loss.png").read_bytes()
    assert json.loads((dest / "speedrun.json").read_text())["total_seconds"] == 60.0
    assert "## Reasoning strategies: SFT (test split)" in text
    assert (dest / "matrix.json").read_text() == matrices["sft"]
    assert (dest / "matrix-grpo.json").read_text() == matrices["grpo"]
    (tmp_path / "afile").write_text("x")  # a NotADirectoryError traceback, after writing the run's card
    with pytest.raises(PocketError, match="afile is a file: --publish takes a folder"):
        publish_report(run, tmp_path / "afile")


def test_card_says_what_the_model_is_and_what_came_before_the_mixture(tmp_path):
    model = {"n_layer": 6, "d_model": 256, "n_head": 4, "vocab_size": 4096, "smear_keys": True}
    summary = {"params": 5_870_000, "copy_warmup_tokens": 1_228_800,
               "realised_mixture": {"world": {"weight": 1.0, "share": 1.0, "tokens": 4_915_200, "epochs": 2.0}}}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"model": model, "meta": {"preset": "small", "copy_warmup": 300, "summary": summary}}))
    text = write_report(tmp_path).read_text()
    assert ("Model: `small`, 5.87M parameters (6 layers, d_model 256, 4 heads, vocab 4096); smeared keys "
            "(`model.smear_keys`).") in text
    assert "Before the mixture: 1.23M tokens of random token segments" in text and "copy_warmup = 300`" in text
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {"model": {**model, "smear_keys": False}, "meta": {"preset": "small", "summary": {"params": 5_870_000}}}))
    text = write_report(tmp_path).read_text()
    assert "smeared" not in text and "Before the mixture" not in text


def test_the_diversity_section_says_what_its_own_table_shows():
    base = {"entropy": 2.848, "distinct_names": 0.75, "names_per_answer": 1.4375}
    sft = {"entropy": 2.876, "distinct_names": 0.988, "names_per_answer": 4.2}
    ppo = {"entropy": 2.870, "distinct_names": 0.987, "names_per_answer": 4.1}
    grpo = {"entropy": 2.842, "distinct_names": 0.996, "names_per_answer": 4.3}
    text = diversity_reading({"base": base, "sft": sft, "ppo": ppo, "grpo": grpo})
    assert "token entropy 2.848 in the base model, PPO 2.870 (higher), GRPO 2.842 (lower)." in text
    assert "The base model writes 1.4 names an answer against SFT's 4.2" in text
    # A base model that writes as many names as SFT: its distinct-name share needs no caveat.
    text = diversity_reading({"base": {**base, "names_per_answer": 4.0}, "sft": sft, "ppo": ppo})
    assert "PPO 2.870 (higher)." in text and "names an answer" not in text and "GRPO" not in text
    # Nothing after RL to compare: the claim and where to measure it, no reading.
    assert "In this run" not in diversity_reading({"base": base, "sft": sft})


def test_a_card_is_written_only_for_a_run(tmp_path, tiny_model, chat):
    """A misspelt run made an empty card in a new directory; a model directory got an empty card beside its weights."""
    from pocketgpt.checkpoint import save_model

    with pytest.raises(PocketError, match="does not exist"):
        write_report(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    save_model(tiny_model, tmp_path / "run" / "base", chat, {"stage": "base"})
    with pytest.raises(PocketError, match="is a model directory"):
        write_report(tmp_path / "run" / "base")
    with pytest.raises(PocketError, match="is not a run directory"):
        write_report(tmp_path)
    assert not (tmp_path / "run" / "base" / "report.md").exists()
    assert write_report(tmp_path / "run").exists()


def test_an_accuracy_at_0_or_100_percent_shows_its_one_sided_interval():
    """The Wilson interval of 0 right of 10 is [0%, 28%]: "0.0% ±14%" halved its reach."""
    from pocketgpt.evaluate.report import accuracy_cell

    assert accuracy_cell({"accuracy": 0.0, "ci_low": 0.0, "ci_high": 0.2775}) == "0.0% (95%: up to 28%)"
    assert accuracy_cell({"accuracy": 1.0, "ci_low": 0.7225, "ci_high": 1.0}) == "100.0% (95%: from 72%)"
    assert accuracy_cell({"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}) == "50.0% ±10%"
