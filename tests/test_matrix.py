"""The strategy matrix: every cell measured and written, and the report card's table."""

import json

import pytest
from conftest import ScriptedLM

from pocketgpt.common import PocketError
from pocketgpt.data.tasks import get_task
from pocketgpt.evaluate.report import write_report
from pocketgpt.reason.lm import Generation
from pocketgpt.reason.matrix import MATRIX, WORKED, Cell, run_matrix
from pocketgpt.reason.strategies import Settings


def knows_arithmetic(messages, request):
    """Right on arithmetic questions (the last user turn), a fixed wrong answer elsewhere."""
    question = messages[-1]["content"]
    example = next((e for e in get_task("arithmetic").examples("test") if e.question == question), None)
    return [Generation(f"Answer: {example.answer}" if example else "Answer: 0", "stop")] * request.n


def test_matrix_writes_every_cell_and_the_report_shows_them(tmp_path):
    cells = [Cell("arithmetic", "direct", "direct"), Cell("arithmetic", "CoT-SC", "self_consistency", {"k": 3}),
             Cell("compare_decimals", "CoT", "cot")]
    out = tmp_path / "sft" / "matrix"
    results = run_matrix(ScriptedLM(knows_arithmetic), out, n=5, cells=cells, log=lambda *a, **k: None)
    saved = json.loads((out / "matrix.json").read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    by_label = {(c["task"], c["label"]): c for c in saved["cells"]}
    assert by_label[("arithmetic", "direct")]["accuracy"] == 1.0 and by_label[("compare_decimals", "CoT")]["accuracy"] == 0
    assert by_label[("arithmetic", "CoT-SC")]["calls"] == 5 and by_label[("arithmetic", "direct")]["n"] == 5
    rows = [json.loads(line) for line in (out / "cells" / "arithmetic__CoT-SC.jsonl").open()]
    assert len(rows) == 5 and all(sum(r["votes"].values()) == 3 for r in rows)
    report = write_report(tmp_path).read_text()
    assert "## Reasoning strategies: SFT" in report and "| arithmetic | CoT-SC | 100.0% |" in report
    assert saved["measured"]["cpu_isa"] and "Measured at" in report.split("## Reasoning strategies")[1]


def test_a_matrix_run_again_keeps_the_cells_it_measured(tmp_path):
    """Cells measured for the same model, split, settings and n are kept (an interrupted matrix continues,
    cells asked for in several runs gather); a different n or setting is refused: it dropped every cell
    measured before from matrix.json and the report card, without a word."""
    calls = []

    def counting(messages, request):
        calls.append(request.n)
        return knows_arithmetic(messages, request)

    direct, cot = Cell("arithmetic", "direct", "direct"), Cell("compare_decimals", "CoT", "cot")
    out = tmp_path / "matrix"
    run_matrix(ScriptedLM(counting), out, n=4, cells=[direct], log=lambda *a, **k: None)
    assert len(calls) == 4
    results = run_matrix(ScriptedLM(counting), out, n=4, cells=[cot, direct], log=lambda *a, **k: None)
    assert len(calls) == 8  # only the new cell asked the model
    saved = json.loads((out / "matrix.json").read_text())
    # in the order of the matrix's rows, whatever order they were asked or measured in
    assert [(c["task"], c["label"]) for c in saved["cells"]] == [("arithmetic", "direct"), ("compare_decimals", "CoT")]
    assert saved == json.loads(json.dumps(results, default=str)) and saved["cells"][0]["accuracy"] == 1.0
    results = run_matrix(ScriptedLM(counting), out, n=4, cells=[cot], log=lambda *a, **k: None)
    assert len(calls) == 8 and [c["label"] for c in results["cells"]] == ["direct", "CoT"]  # the other cell stays
    saved = json.loads((out / "matrix.json").read_text())  # as written before `quote` was a setting
    del saved["settings"]["quote"]
    (out / "matrix.json").write_text(json.dumps(saved))
    run_matrix(ScriptedLM(counting), out, n=4, cells=[cot, direct], log=lambda *a, **k: None)
    assert len(calls) == 8  # a setting added since counts as its default: nothing measured again
    before = (out / "matrix.json").read_text()
    with pytest.raises(PocketError, match=r"holds 2 cells measured otherwise \(n 4, now 3\): give another --out"):
        run_matrix(ScriptedLM(counting), out, n=3, cells=[direct], log=lambda *a, **k: None)
    with pytest.raises(PocketError, match=r"\(settings.quote False, now True\)"):
        run_matrix(ScriptedLM(counting), out, Settings(quote=True), n=4, cells=[direct], log=lambda *a, **k: None)
    assert len(calls) == 8 and (out / "matrix.json").read_text() == before
    run_matrix(ScriptedLM(counting), tmp_path / "n3", n=3, cells=[direct], log=lambda *a, **k: None)
    assert len(calls) == 11 and [c["n"] for c in json.loads((tmp_path / "n3" / "matrix.json").read_text())["cells"]] == [3]
    (out / "matrix.json").write_text("{")
    with pytest.raises(PocketError, match="matrix.json is not valid JSON"):
        run_matrix(ScriptedLM(counting), out, n=3, cells=[direct], log=lambda *a, **k: None)


def test_cells_gathered_from_several_runs_say_where_each_was_measured(tmp_path, monkeypatch):
    import pocketgpt.reason.matrix as matrix_module
    from pocketgpt.common import provenance

    direct, cot = Cell("arithmetic", "direct", "direct"), Cell("compare_decimals", "CoT", "cot")
    out = tmp_path / "sft" / "matrix"
    monkeypatch.setattr(matrix_module, "provenance", lambda: {**provenance(), "commit": "aaaaaaaaaaaa"})
    run_matrix(ScriptedLM(knows_arithmetic), out, n=2, cells=[direct], log=lambda *a, **k: None)
    old = json.loads((out / "matrix.json").read_text())  # as written before cells recorded it: the run's record
    (out / "matrix.json").write_text(json.dumps({**old, "cells": [{k: v for k, v in c.items() if k != "measured"}
                                                                  for c in old["cells"]]}))
    monkeypatch.setattr(matrix_module, "provenance", lambda: {**provenance(), "commit": "bbbbbbbbbbbb"})
    saved = run_matrix(ScriptedLM(knows_arithmetic), out, n=2, cells=[cot], log=lambda *a, **k: None)
    assert [c["measured"]["commit"] for c in saved["cells"]] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    assert saved["measured"]["commit"] == "bbbbbbbbbbbb"  # the last run
    card = write_report(tmp_path).read_text().split("## Reasoning strategies")[1]
    assert "- 1 cell: Measured at commit aaaaaaaaaaaa" in card and "- 1 cell: Measured at commit bbbbbbbbbbbb" in card


def test_the_matrix_holds_the_comparisons_of_the_talk():
    rows = {(c.task, c.strategy) for c in MATRIX}
    for wanted in [("game24", "direct"), ("game24", "cot"), ("game24", "self_consistency"), ("game24", "tot"),
                   ("arithmetic", "react"), ("arithmetic", "reflection"), ("multihop", "react"),
                   ("compare_decimals", "self_consistency"), ("structured", "constrained")]:
        assert wanted in rows
    assert [c.overrides.get("beam") for c in MATRIX if c.strategy == "tot" and not c.overrides.get("oracle")][:2] == [1, 5]


def test_the_talks_orderings_are_compared_question_by_question(tmp_path):
    """CoT right where direct is wrong on every question: the paired difference is +100% with an interval
    above zero, in matrix.json and on the report card; rows that asked other questions are not paired."""
    from pocketgpt.reason.matrix import comparisons, paired_difference

    def works_it_out(messages, request):  # right unless held to a bare number (the direct rows)
        return knows_arithmetic(messages, request) if request.regex is None else [Generation("0", "stop")] * request.n

    out = tmp_path / "sft" / "matrix"
    cells = [Cell("arithmetic", "direct", "direct"), Cell("arithmetic", "CoT", "cot")]
    saved = run_matrix(ScriptedLM(works_it_out), out, n=20, cells=cells, log=lambda *a, **k: None)
    [c] = saved["comparisons"]
    assert (c["first"], c["second"], c["n"], c["wins"], c["losses"]) == ("CoT", "direct", 20, 20, 0)
    assert c["difference"] == 1.0 and 0 < c["ci_low"] <= c["ci_high"] == 1.0
    assert "| arithmetic | CoT vs direct | +100.0% |" in write_report(tmp_path).read_text()
    same = paired_difference([True, False, True, False], [True, False, True, False])
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0 and same["wins"] == same["losses"] == 0
    mixed = paired_difference([True, False] * 10, [False, True] * 10)
    assert mixed["ci_low"] < 0 < mixed["ci_high"] and mixed["wins"] == mixed["losses"] == 10
    path = out / "cells" / "arithmetic__direct.jsonl"
    path.write_text("".join(line.replace('"question": "', '"question": "other ') + "\n"
                            for line in path.read_text().splitlines()))
    assert comparisons(out, saved["cells"]) == []


def test_every_vote_is_compared_with_one_of_its_own_samples(tmp_path):
    """A vote right where four of its five samples are wrong (each another way): +80% over one sample, in matrix.json and on
    the report card, beside its curve; a cell without votes, or reflection's, gets no such comparison."""

    def right_first(messages, request):  # of the n samples only the first is right, and each says another number
        [right] = knows_arithmetic(messages, request)[:1]
        return [right] + [Generation(f"Answer: {i}", "stop") for i in range(1, request.n)]

    out = tmp_path / "sft" / "matrix"
    cells = [Cell("arithmetic", "CoT", "cot", WORKED), Cell("arithmetic", "CoT-SC", "self_consistency", WORKED),
             Cell("arithmetic", "reflection", "reflection", WORKED)]  # it accepts no attempt: their vote answers
    saved = run_matrix(ScriptedLM(right_first), out, n=10, cells=cells, log=lambda *a, **k: None)
    voted = next(c for c in saved["cells"] if c["label"] == "CoT-SC")
    assert voted["accuracy"] == 1.0 and voted["one_sample"] == pytest.approx(1 / 5)
    assert voted["vote_curve"] == [1.0] * 5  # every answer has one vote: the first given, the right one, wins
    [c] = [c for c in saved["comparisons"] if c["second"] == "CoT-SC, one sample"]
    assert c["difference"] == pytest.approx(0.8) and c["wins"] == 10 and c["losses"] == 0 and c["ci_low"] > 0
    assert next(c for c in saved["cells"] if c["label"] == "reflection")["one_sample"] == 1.0
    assert [c["second"] for c in saved["comparisons"] if c["second"].endswith("one sample")] == ["CoT-SC, one sample"]
    card = write_report(tmp_path).read_text()
    assert "| arithmetic | CoT-SC vs CoT-SC, one sample | +80.0% |" in card
    assert "vote of 1 / 2 / ... samples: 20% / 100% / 100% / 100% / 100%" in card

