import json
import subprocess
import sys

import pytest

from pocketgpt.checkpoint import save_model
from pocketgpt.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    for argv in (["--help"], ["speedrun", "--help"], ["tokenizer", "train", "--help"], ["pretrain", "--help"],
                 ["sample", "--help"], ["info", "--help"], ["config", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "resume" in out and "temperature" in out


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "pocketgpt.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "speedrun" in done.stdout


def test_sample_and_info(tmp_path, tiny_model, chat, capsys):
    save_model(tiny_model, tmp_path / "base", chat, {"summary": {"steps": 3, "params": 1, "tokens": 5}})
    assert main(["sample", str(tmp_path), "--prompt", "def", "--max-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def")
    assert main(["sample", str(tmp_path), "--chat", "--n", "2", "--max-tokens", "4", "--temperature", "0"]) == 0
    assert "sample 2" in capsys.readouterr().out
    assert main(["info", str(tmp_path)]) == 0
    assert "2 layers" in capsys.readouterr().out


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path), "--set", "pretrain.train.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_tasks_list_and_export(tmp_path, capsys):
    import json

    assert main(["tasks", "list"]) == 0
    assert "game24" in capsys.readouterr().out
    out = tmp_path / "a.jsonl"
    assert main(["tasks", "export", "arithmetic", "--style", "cot", "--split", "test", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 300 and all(m["role"] in ("user", "assistant") for r in rows for m in r["messages"])
    assert main(["tasks", "export", "arithmetic", "--style", "poem", "--out", str(out)]) == 2


def test_quick_speedrun_runs_every_stage_and_resumes(tmp_path):
    """The main job end to end (tiny settings); run again, every stage is skipped and the report
    card keeps the time each stage took when it ran."""
    command = [sys.executable, "-m", "pocketgpt.cli", "speedrun", "--quick", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    timing = json.loads((tmp_path / "speedrun.json").read_text())
    assert list(timing["stage_seconds"]) == ["tokenizer", "pretrain", "sft", "rm", "ppo", "grpo", "eval"]
    for stage in ("base", "sft", "sft_naive", "rm", "ppo", "grpo"):
        assert (tmp_path / stage / "model.safetensors").exists()
    report = (tmp_path / "report.md").read_text()
    assert "| arithmetic |" in report
    stages = [line.split("|")[1].strip() for line in report.split("## Stages")[1].split("##")[0].splitlines()
              if line.startswith("| ") and not line.startswith("| stage")]
    assert stages == ["tokenizer", "base", "sft", "sft_naive", "rm", "ppo", "grpo"]  # in pipeline order
    assert "val_pair_accuracy" in report  # the reward model's held-out accuracy

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already finished, skipped") == 6  # progress goes to stderr
    retimed = json.loads((tmp_path / "speedrun.json").read_text())["stage_seconds"]
    for stage in ("tokenizer", "pretrain", "sft", "rm", "ppo", "grpo"):
        assert retimed[stage] == timing["stage_seconds"][stage]
