import json

from pocketgpt.speedrun import StageClock, probes_line


def test_probes_line_reads_as_a_sentence():
    line = probes_line({"entropy": 5.6145, "distinct_names": 0.789, "names_per_answer": 1.8125},
                       {"expression": 1.0, "result": 0.5, "list": 0.0})
    assert line == ("diversity: entropy 5.61 nats, 79% distinct names, 1.8 names an answer; "
                    "in-context copying: expression 100%, result 50%, list 0%")


def test_stage_clock_keeps_the_stages_an_interrupted_run_finished(tmp_path):
    """Killed during its third stage, a run has written the first two; the run that resumes skips them and
    counts them at what they took then, and the card's total is the whole pipeline's."""
    path = tmp_path / "speedrun.json"
    first = StageClock(path, None)
    for name in ("tokenizer", "pretrain", "sft"):
        first.start(name)
        first.worked()
    # killed here: sft never stops
    written = json.loads(path.read_text())["stage_seconds"]
    assert list(written) == ["tokenizer", "pretrain"]
    written = {"tokenizer": 1.0, "pretrain": 600.0}  # what they took, as a slow machine would
    path.write_text(json.dumps({"stage_seconds": written, "total_seconds": 601.0}))
    again = StageClock(path, None)
    for name in ("tokenizer", "pretrain", "sft"):
        again.start(name)  # tokenizer and pretrain skipped as complete
        if name == "sft":
            again.worked()
    again.stop()
    timing = json.loads(path.read_text())
    assert timing["stage_seconds"]["pretrain"] == 600.0 and timing["stage_seconds"]["tokenizer"] == 1.0
    assert list(timing["stage_seconds"]) == ["tokenizer", "pretrain", "sft"]
    assert timing["total_seconds"] == 601.0 + timing["stage_seconds"]["sft"] > 601.0
    assert "measured" in timing


def test_a_damaged_timings_file_is_said_and_set_aside(tmp_path, capsys):
    """`report` and the speedrun ended in a JSONDecodeError (or a KeyError) on an edited speedrun.json."""
    from pocketgpt.speedrun import read_timings

    path = tmp_path / "speedrun.json"
    for damaged in ("garbage", '{"stage_seconds": 5}', '{"stage_seconds": {"sft": "x"}, "total_seconds": 1}'):
        path.write_text(damaged)
        assert read_timings(path) is None and StageClock(path, None).stage_seconds == {}
        assert "speedrun.json is damaged" in capsys.readouterr().err
    path.write_text(json.dumps({"stage_seconds": {"sft": 2.0}, "total_seconds": 2.0}))
    assert StageClock(path, None).stage_seconds == {"sft": 2.0}
