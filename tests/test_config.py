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
    assert set(cfg.pretrain.sources) == {"world", "math", "chat", "docs", "code", "extra"}  # tables merge
    assert [s.name for s in cfg.pretrain.source_specs()] == ["world", "math", "chat", "docs", "extra"]  # 0: out


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
