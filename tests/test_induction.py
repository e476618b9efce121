"""The induction experiment: repeated rows are predictable only from the context; smeared keys learn to copy first."""

import json
from dataclasses import replace

import pytest

from pocketgpt.cli import main
from pocketgpt.common import PocketError
from pocketgpt.lab.induction import Settings, repeated_rows

TINY = ["--preset", "tiny", "--vocab-size", "64", "--seq-len", "64", "--min-segment", "4", "--max-segment", "16",
        "--lr", "1e-2", "--eval-every", "20", "--threads", "1"]


def test_targets_are_the_token_one_segment_back_after_the_first_copy():
    s = Settings(vocab_size=50, seq_len=40, min_segment=3, max_segment=9)
    inputs, targets = repeated_rows(s, 6, seed=0)
    assert inputs.shape == targets.shape == (6, 40)
    for row, target in zip(inputs.tolist(), targets.tolist()):
        n = target.count(-1) + 1  # the first copy's targets but its last are unpredictable
        assert 3 <= n <= 9 and target[:n - 1] == [-1] * (n - 1)
        full = row + [target[-1]]
        assert all(full[t + 1] == full[t + 1 - n] == target[t] for t in range(n - 1, 40))
    assert (repeated_rows(s, 6, seed=0)[0] == inputs).all()  # the same seed, the same rows
    assert not (repeated_rows(s, 6, seed=1)[0] == inputs).all()
    with pytest.raises(PocketError, match="segments"):
        repeated_rows(replace(s, max_segment=40), 1, 0)


def test_smeared_keys_copy_where_plain_keys_are_still_guessing(tmp_path):
    out = tmp_path / "induction"
    assert main(["lab", "induction", str(out), "--steps", "120", *TINY]) == 0
    report = json.loads((out / "induction.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert runs["plain"]["final_copy_acc"] < 0.3 and runs["plain"]["steps_to_copy_50"] is None
    assert runs["smeared"]["final_copy_acc"] > 0.7 and runs["smeared"]["steps_to_copy_50"] <= 100
    assert [c["step"] for c in runs["plain"]["curve"]][:2] == [20, 40]
    assert len(runs["smeared"]["own_key_share"]) == 2  # the tiny model's two layers
    assert (out / "induction.png").stat().st_size > 10_000
    assert "| smeared |" in (out / "summary.md").read_text()

    # the same command again reads the finished runs back; other settings into the same folder are refused
    assert main(["lab", "induction", str(out), "--steps", "120", *TINY]) == 0
    assert json.loads((out / "induction.json").read_text())["runs"] == report["runs"]
    assert main(["lab", "induction", str(out), "--steps", "60", *TINY]) == 2
    with pytest.raises(SystemExit) as exit_:  # refused where it is parsed
        main(["lab", "induction", str(out), "--runs", "plain,other", *TINY])
    assert exit_.value.code == 2
