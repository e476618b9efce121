import json
import subprocess
import sys
from pathlib import Path

import pytest

from pocketgpt import config as configlib
from pocketgpt.common import PocketError
from pocketgpt.speedrun import RunConfig


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[pretrain]\npreset = "tiny"\n[pretrain.train]\nlr = 1\nsteps = 7\n'
                    '[pretrain.sources.extra]\nkind = "text"\npath = "x"\n')
    cfg = configlib.load(RunConfig(), path, ["pretrain.train.steps=9", "pretrain.sources.code.weight=0"])
    assert cfg.pretrain.preset == "tiny" and cfg.pretrain.train.steps == 9
    assert cfg.pretrain.train.lr == 1.0 and isinstance(cfg.pretrain.train.lr, float)
    assert set(cfg.pretrain.sources) == {"world", "math", "spelling", "chat", "docs", "code", "extra"}  # tables merge
    assert [s.name for s in cfg.pretrain.source_specs()] == ["world", "math", "spelling", "chat", "docs", "extra"]  # 0: out


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PocketError, match="unknown config key 'pretrain.train.stepz'"):
        configlib.load(RunConfig(), None, ["pretrain.train.stepz=3"])
    with pytest.raises(PocketError, match="expects int"):
        configlib.load(RunConfig(), None, ["pretrain.train.steps=many"])
    with pytest.raises(PocketError, match="key=value"):
        configlib.load(RunConfig(), None, ["pretrain.train.steps"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain\n")
    with pytest.raises(PocketError, match="bad.toml"):
        configlib.load(RunConfig(), bad)
    bad.write_bytes(b"[pretrain]\npreset = '\xff'\n")  # a UnicodeDecodeError traceback
    with pytest.raises(PocketError, match="bad.toml is not UTF-8 text"):
        configlib.load(RunConfig(), bad)
    with pytest.raises(PocketError, match="is a directory"):  # an IsADirectoryError traceback
        configlib.load(RunConfig(), tmp_path)


RECIPE = Path(__file__).resolve().parents[1] / "configs" / "gpu-d20.toml"

# The recipe at tiny scale: every size it sets, made small; everything else as the recipe says.
TINY = ["tokenizer.vocab_size=1024", "tokenizer.max_chars=1000000", "pretrain.preset=tiny",
        "pretrain.train.steps=12", "pretrain.train.batch_size=4", "pretrain.train.seq_len=128",
        "pretrain.train.warmup_steps=2", "pretrain.train.compile=false", "pretrain.train.eval_every=6",
        "pretrain.train.save_every=6", "pretrain.train.sample_every=1000",
        "sft.train.steps=4", "sft.train.batch_size=4", "sft.train.seq_len=256", "sft.train.warmup_steps=1",
        "sft.train.compile=false", "rm.prompts_per_task=6", "rm.train.steps=3", "rm.train.batch_size=4",
        "rm.train.seq_len=256", "ppo.rollout_size=4", "ppo.max_tokens=32", "ppo.train.steps=2",
        "ppo.train.batch_size=4", "ppo.train.seq_len=256", "grpo.prompts_per_step=2", "grpo.group_size=4",
        "grpo.max_tokens=32", "grpo.train.steps=2", "grpo.train.batch_size=8", "grpo.train.seq_len=256",
        "eval.n=5"]


def test_the_gpu_recipe_is_d20_and_runs_the_whole_speedrun_at_tiny_scale(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = configlib.load(RunConfig(), RECIPE)
    assert cfg.pretrain.preset == "d20" and cfg.tokenizer.vocab_size == 65536
    train = cfg.pretrain.train
    assert (train.batch_size * train.grad_accum * train.seq_len, train.steps, train.compile) == (65536, 21400, True)
    assert cfg.pretrain.sources["fineweb"]["kind"] == "parquet"

    # a stand-in for the web corpus: a folder of parquet shards with a text column
    web = tmp_path / "fineweb"
    web.mkdir()
    for shard in range(2):
        texts = [f"Document {shard}-{i}: the river flows past the old mill and the town square." for i in range(200)]
        pq.write_table(pa.table({"text": texts}), web / f"shard_{shard}.parquet")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "pocketgpt.cli", "speedrun", "--quick", "--config", str(RECIPE), "--out", str(run),
               "--set", f"pretrain.sources.fineweb.path={web}"] + [a for s in TINY for a in ("--set", s)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    base = json.loads((run / "base" / "config.json").read_text())
    assert base["meta"]["summary"]["realised_mixture"]["fineweb"]["tokens"] > 0
    assert base["meta"]["train"]["grad_accum"] == 2 and base["meta"]["train"]["schedule"] == "wsd"
    for stage in ("sft", "rm", "ppo", "grpo"):
        assert (run / stage / "model.safetensors").exists()
    assert "| arithmetic |" in (run / "report.md").read_text()
