import json
import re
import subprocess
import sys

import pytest
import torch

from pocketgpt.checkpoint import save_model
from pocketgpt.cli import build_parser, main
from pocketgpt.common import provenance_line


def test_every_command_has_help(capsys):
    parser = build_parser()
    for argv in (["--help"], ["speedrun", "--help"], ["tokenizer", "train", "--help"], ["pretrain", "--help"],
                 ["sample", "--help"], ["info", "--help"], ["config", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "resume" in out and "temperature" in out


def test_speedrun_takes_its_run_directory_like_every_command(monkeypatch, capsys, tmp_path):
    from pocketgpt import speedrun as speedrun_module

    monkeypatch.chdir(tmp_path)  # the command records the run's world in the directories it is given
    ran = []
    monkeypatch.setattr(speedrun_module, "speedrun", lambda cfg, run_dir: ran.append(str(run_dir)))
    for argv in (["speedrun", "runs/a"], ["speedrun", "--out", "runs/b"], ["speedrun"], ["speedrun", "runs/c", "--out", "runs/c"]):
        assert main(argv) == 0
    assert ran == ["runs/a", "runs/b", "runs/speedrun", "runs/c"]
    assert main(["speedrun", "runs/a", "--out", "runs/b"]) == 2
    assert "two run directories given: runs/a and --out runs/b" in capsys.readouterr().err
    assert ran == ["runs/a", "runs/b", "runs/speedrun", "runs/c"]


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


def test_info_counts_parameters_in_the_weights_and_bytes_on_disk(tmp_path, tiny_model, smeared_model, chat, capsys,
                                                                  monkeypatch):
    from pocketgpt import cli
    from pocketgpt.common import human, human_bytes

    monkeypatch.setattr(cli.console, "width", 200)  # one table row per line
    save_model(smeared_model, tmp_path / "base", chat, {"summary": {"steps": 4, "tokens": 9}})
    save_model(tiny_model, tmp_path / "sft", chat, {"summary": {"steps": 3, "tokens": 5}})  # no "params" in it
    save_model(tiny_model.with_score_head(), tmp_path / "rm", chat, {"summary": {"steps": 2, "tokens": 7}})
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = tiny_model.num_params()
    assert f"base │ 2 layers, d=64, {human(n + 4)} params, smeared keys; 4 steps" in out
    assert f"sft  │ 2 layers, d=64, {human(n)} params; 3 steps" in out
    assert f"rm   │ 2 layers, d=64, {human(n + 64)} params (with a score head); 2 steps" in out
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert f"disk │ {human_bytes(size)}" in out and "BB" not in out
    # one stage's directory tells about its model (it showed the disk alone); a folder that is neither says so
    assert main(["info", str(tmp_path / "rm")]) == 0
    assert f"rm   │ 2 layers, d=64, {human(n + 64)} params (with a score head); 2 steps" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "is neither a run directory nor a model directory" in capsys.readouterr().err


def chat_model_that_calls_the_calculator(tiny_model, chat):
    """The tiny model, made to memorise one tool-using conversation (a few hundred milliseconds)."""
    from pocketgpt.data.tasks.tools import use_calculator

    conversation = [{"role": "user", "content": "What is 12*3?"}, *use_calculator("12*3"),
                    {"role": "assistant", "content": "It is 36."}]
    ids, mask = chat.render(conversation)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if trained else -1 for t, trained in zip(ids[1:], mask[1:])]])
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small run fastest on one thread (ten times faster on a busy machine)
    try:
        for _ in range(150):
            loss = tiny_model(x, targets=y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return tiny_model.eval()


def test_sample_chat_runs_the_tool_loop(tmp_path, tiny_model, chat, capsys):
    model = chat_model_that_calls_the_calculator(tiny_model.train(), chat)
    save_model(model, tmp_path / "sft", chat, {"stage": "sft"})
    assert main(["sample", str(tmp_path), "--chat", "--prompt", "What is 12*3?", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ['calculator({"expression": "12*3"}) -> 36', "It is 36."]  # the call ran, the answer followed


@pytest.mark.parametrize("args, message", [
    (["--prompt", "word " * 500], r"error: the prompt has \d+ tokens; the model's context is 128"),
    (["--max-tokens", "500"], r"error: --max-tokens 500 does not fit: the prompt takes 3 of the model's 128 tokens"),
    (["--top-p", "0"], r"error: top_p must be above 0"),
    (["--chat", "--prompt", " "], r"error: --chat needs the user's message"),
])
def test_bad_sampling_input_is_one_line_and_nothing_else(tmp_path, tiny_model, chat, capsys, args, message):
    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base"})
    assert main(["sample", str(tmp_path), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and re.match(message, err) and err.count("\n") == 1  # no traceback, no echoed prompt


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path), "--set", "pretrain.train.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["arena", "--votes", str(tmp_path / "votes.db")]) == 2  # a misspelt file: not a new, empty one
    assert "votes.db does not exist" in capsys.readouterr().err and not (tmp_path / "votes.db").exists()
    # "does not exist" for what does: a folder given as the votes, a file as the run of a report card
    (tmp_path / "afile").write_text("mine")
    for argv, said in ((["arena", "--votes", str(tmp_path)], "is a directory, not a votes database"),
                       (["report", str(tmp_path / "afile")], "afile is a file, not a run directory"),
                       (["rag", "index", str(tmp_path), "--world", "--out", str(tmp_path / "idx")],
                        "give a folder of documents or --world, not both")):  # the folder was ignored
        assert main(argv) == 2
        assert said in capsys.readouterr().err


def test_bits_per_byte_reads_the_sources_the_model_was_pretrained_on(tmp_path, tiny_model, chat, capsys):
    from pocketgpt.cli import bpb_source

    meta = {"sources": {"world": {"kind": "world", "weight": 3.0, "seed": 7, "n_cities": 12},
                        "code": {"kind": "code", "max_bytes": 4_000_000}, "short": {"kind": "docs", "max_bytes": 1000}}}
    world = bpb_source("world", meta)  # the run's own world, not the built-in one
    assert (world.kind, world.options["seed"], world.options["n_cities"], world.max_bytes) == ("world", 7, 12, 500_000)
    assert bpb_source("short", meta).max_bytes == 1000 and bpb_source("code", meta).max_bytes == 500_000
    assert bpb_source("docs", {}).kind == "docs"  # an imported model: the built-in source of that kind
    # a misspelt source is one line, before any task is evaluated
    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base"})
    assert main(["eval", str(tmp_path), "--task", "spell", "--n", "2", "--bpb", "docs,wrold"]) == 2
    out, err = capsys.readouterr()
    assert "unknown kind 'wrold'" in err and err.count("\n") == 1 and "spell" not in out


@pytest.mark.parametrize("argv,message", [
    (["eval", "RUN", "--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),  # it hung
    (["eval", "RUN", "--n", "0"], "argument --n: must be at least 1, not 0"),  # it meant the whole split
    (["eval", "RUN", "--shots", "-1"], "argument --shots: must be at least 0, not -1"),
    (["eval", "RUN", "--strategy", "tot", "--beam", "0"], "argument --beam: must be at least 1"),
    (["pretrain", "RUN", "--steps", "-5"], "argument --steps: must be at least 1, not -5"),
    (["serve", "RUN", "--port", "99999"], "argument --port: must be between 1 and 65535, not 99999"),
    (["serve", "RUN", "--max-batch", "0"], "argument --max-batch: must be at least 1"),
    (["chat", "RUN", "--temperature", "-2"], "argument --temperature: must be a number >= 0, not -2"),
    (["sample", "RUN", "--threads", "x"], "argument --threads: invalid integer value: 'x'"),
    (["sample", "RUN", "--max-tokens", "0"], "argument --max-tokens: must be at least 1, not 0"),
    # the lab: `grokking --runs ,` trained nothing and overwrote a report with an empty one, `scaling --n 0`
    # failed after training every rung, `diversity --shots -1` ran
    (["lab", "grokking", "OUT", "--runs", ","], "argument --runs: none given: choose from weight_decay"),
    (["lab", "grokking", "OUT", "--runs", "grokfast,bogus"], "argument --runs: unknown bogus"),
    (["lab", "grokking", "OUT", "--train-frac", "1.5"], "argument --train-frac: must be between 0 and 1"),
    (["lab", "grokking", "OUT", "--lr", "0"], "argument --lr: must be a number > 0"),
    (["lab", "induction", "OUT", "--runs", ","], "argument --runs: none given: choose from plain, smeared"),
    (["lab", "scaling", "RUN", "--n", "0"], "argument --n: must be at least 1, not 0"),
    (["lab", "recall", "RUN", "--window", "0"], "argument --window: must be at least 1, not 0"),  # 0 was the default
    (["lab", "diversity", "RUN", "--shots", "-1"], "argument --shots: must be at least 0, not -1"),
    # `sft --name ""` wrote into the run folder itself, `--name rm` over the reward model, `../x` outside the run
    (["sft", "RUN", "--name", ""], "argument --name: '' is not a folder name"),
    (["sft", "RUN", "--name", "../x"], "argument --name: '../x' is not a folder name"),
    (["sft", "RUN", "--name", "rm"], "argument --name: 'rm' is a folder of the run's own"),
    (["sft", "RUN", "--name", "tokenizer"], "argument --name: 'tokenizer' is a folder of the run's own"),
])
def test_numbers_out_of_range_are_refused_where_they_are_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("setting,message", [("pretrain.train.steps=-5", "train.steps must be at least 1, not -5"),
                                             ("pretrain.train.schedule=bogus", "unknown train.schedule 'bogus'"),
                                             ("pretrain.train.optimizer=lion", "unknown train.optimizer 'lion'"),
                                             ("pretrain.train.dtype=int8", "unknown train.dtype 'int8'"),
                                             ("pretrain.train.eval_batches=0", "train.eval_batches must be at least 1"),
                                             ("pretrain.train.beta1=5", "beta1 and beta2 must be in [0, 1)"),
                                             ("pretrain.preset=huge", "unknown pretrain.preset 'huge'"),
                                             ("pretrain.model.bogus=1", "unknown pretrain.model setting 'bogus'"),
                                             ("pretrain.val_fraction=2", "val_fraction must be in (0, 1)"),
                                             ("tokenizer.max_chars=0", "max_chars at least 1")])
def test_training_settings_are_checked_when_set(tmp_path, capsys, setting, message):
    """Not steps later: -5 steps trained nothing and wrote the model, a bad schedule failed after warmup."""
    assert main(["pretrain", str(tmp_path), "--quick", "--set", setting]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "base").exists()


@pytest.mark.parametrize("stage,setting,message", [
    # tracebacks once the stage ran
    ("ppo", "ppo.rollout_size=0", "ppo.rollout_size must be at least 1, not 0"),
    ("ppo", "ppo.ppo_epochs=0", "ppo.ppo_epochs must be at least 1"),
    ("ppo", "ppo.tasks=[]", "ppo.tasks must be a list of at least one task of factqa"),
    ("rm", 'rm.tasks=["nope"]', "rm.tasks must be a list of tasks of factqa"),  # after the model's sampling
    ("grpo", "grpo.eval_n=0", "grpo.eval_n must be at least 1"),
    # trained without a word
    ("ppo", "ppo.lam=2", "ppo.lam must be in [0, 1], not 2.0"),
    ("grpo", "grpo.group_size=1", "grpo.group_size must be at least 2 (advantages are within a group)"),
    ("grpo", "grpo.clip=-1", "grpo.clip must be a number > 0"),
    ("rm", "rm.noise=5", "rm.noise must be a probability, in [0, 1], not 5.0"),
    ("sft", "sft.lora.alpha=0", "lora.alpha must be a number > 0, not 0.0"),  # adapters scaled by 0
    ("sft", "sft.lora.targets=[]", "lora.targets must be at least one layer name"),
    ("sft", "sft.tasks.arithmetic=5", "sft.tasks must be tables like"),  # an AttributeError
    ("sft", "sft.tasks.arithmetic={n=-5}", "sft.tasks must be tables like"),  # all but the last 5 examples
    ("sft", "sft.data=[1]", "sft.data must be a list of file names"),  # a TypeError
])
def test_post_training_settings_are_checked_when_set(tmp_path, capsys, stage, setting, message):
    assert main([stage, str(tmp_path), "--quick", "--set", setting, *(["--set", "sft.lora.r=4"] * (stage == "sft"))]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / stage).exists()


@pytest.mark.parametrize("args,message", [
    (["--task", "spell,nosuch"], "unknown task 'nosuch'"),
    (["--task", "spell", "--style", "nonsense"], "task 'spell' has no style 'nonsense'; its styles: direct"),
    (["--task", "spell", "--bpb", "text"], "--bpb text: a text source reads files"),
    (["--task", "spell", "--out", "FILE"], "is a file; give a directory"),
    (["--matrix", "--cells", "zzzz"], "no matrix cell matches --cells 'zzzz'"),  # after a minute's compile before
    (["--task", "spell", "--strategy", "cot", "--bpb", "docs"], "--bpb: settings of the plain evaluation"),
    # accepted and ignored before
    (["--task", "spell", "--strategy", "cot", "--style", "cot", "--bf16"], "--style, --bf16: settings of the plain"),
    (["--task", "spell", "--strategy", "cot", "--mode", "fewshot", "--batch-size", "1"], "--mode, --batch-size: "),
    (["--matrix", "--task", "spell"], "--matrix evaluates its cells, not --task: choose them with --cells"),
    (["--task", "spell", "--strategy", "react", "--tools", ","], "--tools: ReAct needs at least one tool"),
    # a strategy's flag given to another strategy, the server's without one: ignored before
    (["--task", "spell", "--strategy", "cot", "--k", "3", "--beam", "2"], "--k, --beam: not read by the cot strategy"),
    (["--task", "spell", "--strategy", "direct", "--temperature", "1"], "--temperature: not read by the direct"),
    (["--task", "spell", "--strategy", "cot", "--api-key", "x"], "--api-key: settings of --server, which is not given"),
    # a task the strategy cannot take, after the tasks before it had run
    (["--task", "spell,game24", "--strategy", "tot"], "tot searches Game of 24 positions; task 'spell'"),
    (["--task", "spell,nosuch", "--strategy", "direct"], "unknown task 'nosuch'"),
])
def test_eval_refuses_bad_arguments_before_evaluating_anything(tmp_path, tiny_model, chat, capsys, args, message):
    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base"})
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    assert main(["eval", str(tmp_path), "--n", "2", *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and err.count("\n") == 1 and "spell" not in out.replace("evaluating", "")
    assert not (tmp_path / "base" / "eval").exists()


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
    """The main job end to end (tiny settings) in a world of its own seed; run again, every stage is
    skipped and the report card keeps the time each stage took when it ran."""
    from pocketgpt.data.world import World, WorldConfig

    command = [sys.executable, "-m", "pocketgpt.cli", "speedrun", str(tmp_path), "--quick"]
    first = subprocess.run(command + ["--set", "world.seed=3"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    # every stage and task used world 3: pretraining documents, the evaluation's questions, the report card
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 3
    assert json.loads((tmp_path / "base" / "config.json").read_text())["meta"]["sources"]["world"]["seed"] == 3
    seed3 = {e.name for e in World.generate(WorldConfig(seed=3)).entities()}
    seed0 = {e.name for e in World.generate(WorldConfig()).entities()}
    questions = [json.loads(line)["question"] for line in (tmp_path / "sft" / "eval" / "factqa_head_test.jsonl")
                 .read_text().splitlines()]
    assert all(any(name in q for name in seed3 - seed0) for q in questions)
    assert "World: seed **3**" in (tmp_path / "report.md").read_text()
    other = subprocess.run(command + ["--set", "world.seed=4"], capture_output=True, text=True)
    assert other.returncode == 2 and "cannot switch" in other.stderr
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
    assert provenance_line(timing["measured"]) in report  # which code and machine took these figures

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already finished, skipped") == 6  # progress goes to stderr
    retimed = json.loads((tmp_path / "speedrun.json").read_text())["stage_seconds"]
    for stage in ("tokenizer", "pretrain", "sft", "rm", "ppo", "grpo"):
        assert retimed[stage] == timing["stage_seconds"][stage]


def test_a_runs_tokenizer_is_not_retrained_under_its_models(tmp_path, capsys):
    """`tokenizer train` on a run with models replaced their tokenizer without a word: every later stage
    read other token ids."""
    run = tmp_path / "run"
    small = ["--vocab-size", "300", "--set", "tokenizer.max_chars=20000"]
    assert main(["tokenizer", "train", str(run), *small]) == 0
    assert main(["tokenizer", "train", str(run), *small]) == 0  # no models yet: trained again
    trained = (run / "tokenizer" / "tokenizer.json").read_bytes()
    (run / "base" / "checkpoints").mkdir(parents=True)  # pretraining has begun
    capsys.readouterr()
    assert main(["tokenizer", "train", str(run), *small]) == 2
    assert "run/tokenizer is the tokenizer of" in capsys.readouterr().err
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == trained


def test_a_stage_refused_for_a_missing_run_leaves_nothing_behind(tmp_path, capsys):
    """`pretrain RUN` without a tokenizer, `sft RUN` without a base: refused, but RUN/world.json was written
    (and a later run there with another world was refused for it)."""
    for command, missing in ((["pretrain"], "no tokenizer at"), (["sft"], "base does not exist"),
                             (["rm"], "sft does not exist")):
        assert main([*command, str(tmp_path / "run")]) == 2
        assert missing in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
    # a tokenizer that fails on its data (a file that is not Parquet) starts no run either
    (tmp_path / "bad.parquet").write_text("hello")
    assert main(["tokenizer", "train", str(tmp_path / "run"), "--set",
                 f'pretrain.sources.p={{kind="parquet", path="{tmp_path / "bad.parquet"}"}}']) == 2
    assert "bad.parquet: not a Parquet file" in capsys.readouterr().err
    assert not (tmp_path / "run" / "world.json").exists()
    # a world source is the run's world: its own seed was replaced by it without a word
    assert main(["tokenizer", "train", str(tmp_path / "run"), "--set",
                 'pretrain.sources.w2={kind="world", weight=1.0, seed=9}']) == 2
    assert "pretrain.sources.w2 sets seed = 9: a world source is the run's one world" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(tmp_path / "run"), "--vocab-size", "300", "--set", "tokenizer.max_chars=20000",
                 "--set", "world.seed=5"]) == 0  # the first command of a run records its world
    assert json.loads((tmp_path / "run" / "world.json").read_text())["seed"] == 5



def test_eval_of_a_stage_asks_about_its_runs_world(tmp_path, tiny_model, chat):
    """`eval RUN/sft` asked about the default world's entities whatever the run's world (RUN/world.json),
    and wrote those verdicts over the run's own in RUN/sft/eval."""
    from pocketgpt.data.world import World, WorldConfig, record_run_world

    record_run_world(tmp_path, WorldConfig(seed=7))
    save_model(tiny_model, tmp_path / "sft", chat, {"stage": "sft"})
    assert main(["eval", str(tmp_path / "sft"), "--task", "factqa_head", "--n", "3", "--no-compile"]) == 0
    seed7 = {e.name for e in World.generate(WorldConfig(seed=7)).entities()}
    seed0 = {e.name for e in World.generate(WorldConfig()).entities()}
    questions = [json.loads(line)["question"] for line in
                 (tmp_path / "sft" / "eval" / "factqa_head_test.jsonl").read_text().splitlines()]
    assert len(questions) == 3 and all(any(name in q for name in seed7 - seed0) for q in questions)


def test_a_speedrun_run_again_with_other_steps_names_them(tmp_path, tiny_model, chat, capsys):
    """A --quick run run again without --quick was told to delete its pretrained model ("holds a finished
    model and no training state ... delete RUN/base to train it again")."""
    save_model(tiny_model, tmp_path / "base", chat, {"stage": "base", "summary": {"steps": 60}})
    assert main(["speedrun", str(tmp_path), "--set", "tokenizer.vocab_size=300",
                 "--set", "tokenizer.max_chars=20000"]) == 2
    err = capsys.readouterr().err
    assert "base holds a model trained for 60 steps, where this configuration asks for 3000" in err
    assert "delete" not in err and (tmp_path / "base" / "model.safetensors").exists()


def test_a_reward_model_is_not_taken_for_a_model_that_writes(tmp_path, tiny_model, chat, capsys):
    """`serve` refused it, but `chat`, `sample` and `eval` talked with its LM head, and GRPO trained from it."""
    save_model(tiny_model.with_score_head(), tmp_path / "rm", chat, {"stage": "rm"})
    for argv in (["sample", str(tmp_path / "rm"), "--prompt", "hi"], ["eval", str(tmp_path / "rm"), "--n", "1"],
                 ["eval", str(tmp_path / "rm"), "--strategy", "direct", "--n", "1"], ["chat", str(tmp_path / "rm")],
                 ["grpo", str(tmp_path), "--quick", "--set", "grpo.start=rm"]):
        assert main(argv) == 2, argv
        assert "rm is a reward model: it scores text, it does not write it" in capsys.readouterr().err


def test_a_command_that_runs_in_one_process_is_refused_under_torchrun(tmp_path, monkeypatch, capsys):
    """`torchrun ... eval RUN/sft`: every process ran the whole evaluation, printed every line and wrote the
    same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", str(tmp_path / "run" / "sft")]) == 2
    assert "`pocketgpt eval` runs in one process: run it without torchrun" in capsys.readouterr().err
