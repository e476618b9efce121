"""Battles: the rubric's verdicts, a judge model's position bias cancelled, and `pocketgpt arena`."""

import json
import shutil

import torch
from conftest import ScriptedLM

from pocketgpt.checkpoint import save_model
from pocketgpt.cli import main
from pocketgpt.data.tasks import get_task
from pocketgpt.evaluate.arena import Battle, VoteStore
from pocketgpt.evaluate.battles import judge_verdicts, rubric_verdict
from pocketgpt.evaluate.report import write_report
from pocketgpt.model import GPT, preset
from pocketgpt.reason.lm import Generation


def test_rubric_prefers_right_then_honest_then_wrong():
    task = get_task("factqa_head")
    e = task.examples("test")[0]
    assert rubric_verdict(task, e, e.answer, "I don't know.") == "a"
    assert rubric_verdict(task, e, "Zzyzx", "I don't know.") == "b"
    assert rubric_verdict(task, e, e.answer, e.answer) == "tie"
    assert rubric_verdict(task, e, "Zzyzx", "Qwerty") == "both_bad"


def test_a_judge_that_always_picks_the_first_answer_is_cancelled():
    always_a = ScriptedLM(lambda messages, r: [Generation("A", "stop")])
    fair = ScriptedLM(lambda messages, r: [Generation("B" if "Answer A:\nwrong" in messages[0]["content"] else "A",
                                                      "stop")])
    pairs = [("q", "right", "wrong"), ("q", "wrong", "right")]
    assert judge_verdicts(always_a, pairs) == ["tie", "tie"]
    assert judge_verdicts(fair, pairs) == ["a", "b"]


def test_arena_command_rates_checkpoints_and_votes(tmp_path, chat, capsys):
    run = tmp_path / "run"
    for seed, stage in enumerate(("sft", "ppo")):
        torch.manual_seed(seed)
        save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size, max_seq_len=512)), run / stage, chat,
                   {"stage": stage})
    assert main(["arena", str(run / "sft"), str(run / "ppo"), "--n", "3", "--tasks", "arithmetic,compare_decimals",
                 "--rounds", "10", "--device", "cpu"]) == 0
    board = json.loads((run / "arena" / "leaderboard.json").read_text())
    assert board["battles"] == 6 and {r["model"] for r in board["rows"]} == {"sft", "ppo"}
    assert all(r["ci_low"] <= r["rating"] <= r["ci_high"] for r in board["rows"])
    assert board["measured"]["date"] and board["measured"]["cpu_isa"]
    assert len((run / "arena" / "battles.jsonl").read_text().splitlines()) == 6
    assert (run / "arena" / "leaderboard.png").stat().st_size > 0
    # run directories, of two runs: written into the first's run (it was their parent folder), named by run
    save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size, max_seq_len=512)), tmp_path / "other" / "sft",
               chat, {"stage": "sft"})
    assert main(["arena", str(run), str(tmp_path / "other"), "--n", "1", "--tasks", "arithmetic", "--rounds", "10",
                 "--device", "cpu"]) == 0
    board = json.loads((run / "arena" / "leaderboard.json").read_text())
    assert {r["model"] for r in board["rows"]} == {"run/ppo", "other/sft"} and not (tmp_path / "arena").exists()
    # two runs of one name in different folders: their whole paths (the clash stopped it after every answer)
    shutil.copytree(tmp_path / "other", tmp_path / "elsewhere" / "other")
    assert main(["arena", str(tmp_path / "other"), str(tmp_path / "elsewhere" / "other"), "--n", "1", "--tasks",
                 "arithmetic", "--rounds", "10", "--device", "cpu", "--out", str(tmp_path / "same")]) == 0
    board = json.loads((tmp_path / "same" / "leaderboard.json").read_text())
    assert {r["model"] for r in board["rows"]} == {str(tmp_path / "other" / "sft"), str(tmp_path / "elsewhere" / "other" / "sft")}
    assert main(["arena", str(run / "sft"), str(run / "sft")]) == 2
    assert "the same checkpoint is given twice" in capsys.readouterr().err

    # a base model of a 128-token context: the answers' 128 tokens left no room for its few-shot prompt
    save_model(GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size, max_seq_len=128)), tmp_path / "short" / "base",
               chat, {"stage": "base"})
    assert main(["arena", str(tmp_path / "short" / "base"), str(run / "sft"), "--n", "1", "--tasks", "arithmetic",
                 "--rounds", "10", "--device", "cpu"]) == 0

    votes = tmp_path / "votes.db"
    store = VoteStore(votes)
    for winner in ("a", "a", "b", "tie"):
        store.add(Battle("sft", "ppo", winner))
    people = tmp_path / "people" / "arena"  # a run's arena folder, as the report card reads it
    assert main(["arena", "--votes", str(votes), "--rounds", "10", "--out", str(people)]) == 0
    assert "4 votes" in capsys.readouterr().out
    board = json.loads((people / "leaderboard.json").read_text())
    assert board["battles"] == 4 and board["judge"] == "people" and board["unsettled"] is None  # --out was ignored
    (tmp_path / "people" / "metrics.jsonl").touch()
    # the card read "battles" where the people's leaderboard wrote "votes": a KeyError
    assert "## Arena (4 battles, judged by people)" in write_report(tmp_path / "people").read_text()
    assert main(["arena", "--votes", str(votes), "--n", "5", "--tasks", "arithmetic"]) == 2
    assert "--n, --tasks set up battles to play" in capsys.readouterr().err
