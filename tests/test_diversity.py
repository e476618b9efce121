"""The diversity lab: its metrics on hand-made replies, the interval, the entropy read-out, and one
end-to-end run on a tiny run directory that the report card then shows."""

import argparse
import json
import math

import pytest
import torch

from pocketgpt.checkpoint import save_model
from pocketgpt.common import PocketError
from pocketgpt.engine import Engine, SamplingParams
from pocketgpt.lab.diversity import (
    METRICS,
    add_arguments,
    distinct_n,
    main,
    mean_interval,
    seed_metrics,
    token_entropies,
    unique_fraction,
)
from pocketgpt.model import GPT, preset


def test_distinct_n_counts_word_ngrams_within_each_text():
    texts = ["Dorin, Velmo dorin", "Velmo Tasrel"]
    # words: dorin velmo dorin | velmo tasrel -> 3 distinct of 5; bigrams never cross the two texts
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)
    assert distinct_n(texts, 2) == pytest.approx(3 / 3)
    assert distinct_n(["Dorin Dorin Dorin"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["", "!"], 1) == 0.0


def test_unique_fraction_trims_whitespace():
    assert unique_fraction(["Dorin, Velmo", " Dorin, Velmo\n", "Tasrel"]) == pytest.approx(2 / 3)
    assert unique_fraction(["a", "b", "c", "d"]) == 1.0


def test_seed_metrics_on_hand_made_replies():
    shown = ["Here are some names of places in this world: Dorin, Velmo. Invent five more names like these.",
             "Here are some names of places in this world: Kashi, Lumo. Invent five more names like these."]
    replies = [["Sure! Here are five: Dorin, Pavel, Githes", "Pavel, Nomra"],
               ["Lumo, Tirsa", "Lumo, Tirsa"]]
    m = seed_metrics(replies, shown, frozenset({"githes"}), entropies=[1.0, 2.0, 3.0])
    # names: Dorin Pavel Githes | Pavel Nomra | Lumo Tirsa | Lumo Tirsa ("Sure", "Here", "five" are filler)
    assert m["names_per_reply"] == pytest.approx(9 / 4)
    assert m["distinct_names"] == pytest.approx(6 / 9)
    # Dorin and Lumo (x2) were shown, Githes is a world entity: Pavel x2, Nomra, Tirsa x2 are novel
    assert m["novelty"] == pytest.approx(5 / 9)
    assert m["unique_samples"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert m["entropy"] == pytest.approx(2.0)
    assert set(m) == set(METRICS)


def test_silence_is_not_diverse():
    m = seed_metrics([["", ""], ["", ""]], ["Dorin, Velmo", "Kashi"], frozenset(), entropies=[])
    assert m == {"names_per_reply": 0.0, "distinct_names": 0.0, "distinct_1": 0.0, "distinct_2": 0.0,
                 "unique_samples": 0.5, "novelty": 0.0, "entropy": 0.0}
    assert seed_metrics([["Dorin"]], ["x"], frozenset(), entropies=None)["entropy"] is None


def test_mean_interval_is_students_t():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.303 / math.sqrt(3))  # t(0.975, 2) * sd 1 / sqrt(3)
    assert mean - low == pytest.approx(high - mean)
    assert mean_interval([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
    _, low, high = mean_interval([0.0, 1.0] * 50)  # 99 degrees of freedom: t = 1.984
    assert (high - low) / 2 == pytest.approx(1.984 * math.sqrt(100 / 99 / 4) / 10, rel=1e-3)
    with pytest.raises(PocketError, match="at least 2"):
        mean_interval([1.0])


def test_entropy_of_a_uniform_model_is_log_vocab(tokenizer):
    model = GPT(preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # every next-token distribution is uniform
    rows = token_entropies(model, [1, 2, 3], [[4, 5], [], [6, 7, 8]])
    assert [len(r) for r in rows] == [2, 0, 3]
    assert all(h == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-5) for r in rows for h in r)


def test_entropy_matches_the_distribution_the_engine_sampled_from(tiny_model, chat):
    """The teacher-forced read-out sees, at each reply token, the distribution that token was drawn from."""
    vocab = tiny_model.cfg.vocab_size
    prompt = chat.document("Here are some names of places in this world:")
    params = SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=3, logprobs=vocab)
    completions = Engine(tiny_model, chat.tokenizer).generate([prompt], params)
    rows = token_entropies(tiny_model, prompt, [c.tokens for c in completions])
    for c, row in zip(completions, rows):
        engine = [-sum(math.exp(lp) * lp for _, lp in top) for top in c.top_logprobs]
        assert row == pytest.approx(engine, abs=1e-3)


def test_end_to_end_on_a_tiny_run(tokenizer, chat, tmp_path):
    from pocketgpt.evaluate.report import write_report

    run = tmp_path / "run"
    for i, stage in enumerate(("base", "sft", "ppo")):  # no grpo: skipped with a note
        torch.manual_seed(i)
        save_model(GPT(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=512)), run / stage, chat,
                   {"stage": stage})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    main(parser.parse_args([str(run), "--prompts", "2", "--samples", "2", "--seeds", "2", "--max-tokens", "8",
                            "--shots", "1", "--threads", "1"]))
    out = run / "lab" / "diversity"
    results = json.loads((out / "diversity.json").read_text())
    assert list(results["stages"]) == ["base", "sft", "ppo"] and "grpo" in results["skipped"]
    assert results["stages"]["base"]["mode"] == "fewshot" and results["stages"]["sft"]["mode"] == "chat"
    for stage in results["stages"].values():
        assert [s["seed"] for s in stage["seeds"]] == [0, 1]
        for key in METRICS:
            m = stage["metrics"][key]
            assert m["low"] <= m["mean"] <= m["high"], key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 * 2 and all(len(s["replies"]) == 2 for s in samples)
    assert (out / "diversity.png").stat().st_size > 0 and "| base (few-shot) |" in (out / "summary.md").read_text()
    assert "Measured at " in (out / "summary.md").read_text() and results["measured"]["date"]

    report = write_report(run).read_text()
    assert "## Diversity over seeds" in report and "![diversity](lab/diversity/diversity.png)" in report
    assert "| PPO |" in report.split("## Diversity over seeds")[1]


def test_bad_arguments_are_refused(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(PocketError, match="not a run directory"):
        main(parser.parse_args([str(tmp_path / "nowhere")]))
    for flags in (["--seeds", "1"], ["--shots", "-1"], ["--temperature", "0"], ["--stages", ","], ["--stages", "sft,rl"]):
        with pytest.raises(SystemExit):  # argparse's usage error: `--shots -1` ran, `--stages ,` said nothing
            parser.parse_args([str(tmp_path), *flags])
    with pytest.raises(PocketError, match="none of the stages"):
        main(parser.parse_args([str(tmp_path)]))
