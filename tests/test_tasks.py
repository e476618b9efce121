"""The task suite: splits, verifiers (right, wrong, malformed), renderings, tools, export."""

import json
import re
from fractions import Fraction
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketgpt.data.tasks import SPLITS, TASKS, FactQA, default_world, export_jsonl, get_task, solve24
from pocketgpt.data.tasks.base import ANSWERING, decimal_string, final_answer, numbers
from pocketgpt.data.tasks.expr import evaluate, parse
from pocketgpt.data.tasks.game24 import uses_and_makes_24
from pocketgpt.data.tasks.names import distinct_ratio
from pocketgpt.data.tasks.structured import extract_json
from pocketgpt.data.tasks.swiss_cheese import evaluated_words, spelled, spelling_documents
from pocketgpt.data.tasks.tools import SNIPPET_SENTENCES, calculator, search
from pocketgpt.data.world import World, WorldConfig
from pocketgpt.errors import PocketError

NAMES = sorted(TASKS)
MALFORMED = ["", "   \n ", "asdf qwer", "Answer:", "Answer: ????", "∑∫√ 🙂 ｆｕｌｌ", "\x00\x01\x02",
             "{" * 500, "(" * 500 + "x", "9" * 10_000, "Answer: " + "x," * 3000, "```json\n{\n```",
             "__import__('os').system('true')"]


@lru_cache(maxsize=None)
def task(name):
    return get_task(name)


def wrong_answer(name, example):
    """An answer that looks right but is not."""
    m = example.meta
    if name.startswith("factqa"):
        others = {f.value for f in task(name).world.facts if f.attribute == m["attribute"]} - {m["value"]}
        return sorted(others)[0]
    if name in ("arithmetic", "count_letter"):
        return str(int(example.answer) + 1)
    if name == "compare_decimals":
        return m["x"] if m["larger"] == m["y"] else m["y"]
    if name == "spell":
        return spelled(m["word"] + "x")
    if name == "game24":
        shapes = ("{}+{}+{}+{}", "{}*{}*{}*{}", "{}*{}+{}+{}")  # right numbers, wrong value
        return next(e for e in (s.format(*m["numbers"]) for s in shapes) if evaluate(e) != 24)
    if name == "multihop":
        return str(Fraction(example.answer) + 1)
    if name == "structured":
        values = dict(m["values"])
        key = next(iter(values))
        values[key] = values[key] + 1 if isinstance(values[key], int) else values[key] + "x"
        return json.dumps(values)
    if name == "names":
        return "Dorin"
    raise KeyError(name)


# -- splits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_disjoint_nonempty_and_deterministic(name):
    t = task(name)
    splits = {s: t.examples(s) for s in SPLITS}
    questions = {s: {e.question for e in exs} for s, exs in splits.items()}
    keys = {s: {t.split_key(e) for e in exs} for s, exs in splits.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not questions[a] & questions[b]
        assert not keys[a] & keys[b]
    assert all(len(q) == len(splits[s]) > 0 for s, q in questions.items())
    assert get_task(name).examples("test") == splits["test"]  # a fresh instance agrees


@pytest.mark.parametrize("name", ["arithmetic", "compare_decimals", "count_letter", "spell", "structured",
                                  "names"])
def test_generated_tasks_fill_a_few_hundred(name):
    assert len(task(name).examples("test")) == 300
    assert len(task(name).examples("train")) == 1000
    assert get_task(name, seed=1).examples("test") != task(name).examples("test")


def test_bounded_tasks_are_sized_by_their_problem_space():
    assert sum(len(task("game24").examples(s)) for s in SPLITS) == 1362  # the solvable sets of 1..13
    world = task("factqa").world
    assert sum(len(task("factqa").examples(s)) for s in SPLITS) == len(world.facts)
    assert 150 <= len(task("multihop").examples("test")) <= 500


def test_unknown_split_style_and_task_name_the_available_ones():
    with pytest.raises(ValueError, match="validation"):
        task("arithmetic").examples("dev")
    with pytest.raises(ValueError, match="cot"):
        task("arithmetic").render(task("arithmetic").examples("test")[0], "poem")
    with pytest.raises(ValueError, match="direct"):
        task("names").render(task("names").examples("test")[0], "tool")
    with pytest.raises(ValueError, match="game24"):
        get_task("chess")


# -- verifiers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_canonical_answers_and_every_rendering_verify(name):
    t = task(name)
    for example in t.examples("test")[:40]:
        assert t.verify(example, example.answer), (example.question, example.answer)
        for style in [s for s in t.styles if s in ANSWERING]:  # check, propose, value ask other questions
            messages = t.render(example, style)
            assert messages[0] == {"role": "user", "content": example.question}
            assert messages[-1]["role"] == "assistant"
            assert t.verify(example, messages[-1]["content"]), (style, messages[-1]["content"])


@pytest.mark.parametrize("name", NAMES)
def test_wrong_answers_fail(name):
    t = task(name)
    for example in t.examples("test")[:40]:
        wrong = wrong_answer(name, example)
        assert not t.verify(example, wrong), (example.question, wrong)


@pytest.mark.parametrize("name", NAMES)
def test_malformed_answers_fail_without_raising(name):
    t = task(name)
    for example in t.examples("test")[:5]:
        for junk in MALFORMED:
            assert t.verify(example, junk) is False, junk


@pytest.mark.parametrize("name", NAMES)
def test_the_vote_key_agrees_where_the_verifier_reads_the_same_answer(name):
    """A reply and the same answer reworded get one key; a wrong answer gets another; no answer gets ""."""
    t = task(name)
    for example in t.examples("test")[:20]:
        right = t.answer_key(example, f"Answer: {example.answer}")
        assert right and right == t.answer_key(example, f"Some working.\nAnswer: {example.answer}.")
        assert t.answer_key(example, wrong_answer(name, example)) != right, example.question
        assert t.answer_key(example, "") == ""


def test_vote_keys_keep_signs_operators_and_the_named_number():
    arithmetic, decimals, game24 = task("arithmetic"), task("compare_decimals"), task("game24")
    sum_ = arithmetic.examples("test")[0]
    # words alone would make these one answer ("5"), and the two expressions one answer ("13 9 10 4")
    assert arithmetic.answer_key(sum_, "Answer: -5") != arithmetic.answer_key(sum_, "Answer: 5")
    assert arithmetic.answer_key(sum_, "Answer: 1,234.") == arithmetic.answer_key(sum_, "so it is 1234") == "1234"
    puzzle = game24.examples("test")[0]
    assert game24.answer_key(puzzle, "Answer: (13-9)*(10-4)") == game24.answer_key(puzzle, "Answer: (13 - 9) × (10 - 4) = 24")
    assert game24.answer_key(puzzle, "Answer: (13-9)*(10-4)") != game24.answer_key(puzzle, "Answer: (13+9)*(10-4)")
    pair = next(e for e in decimals.examples("test") if len(e.meta["larger"]) < 6)
    larger = pair.meta["larger"]
    assert decimals.answer_key(pair, f"Answer: {larger}") == decimals.answer_key(pair, f"{larger}0 is larger") == larger
    assert decimals.answer_key(pair, "Answer: 123.456") == ""  # names neither number: no vote
    # keys read the reply as the verifier does: lowercased words made these one vote, one right and one wrong
    names, structured = task("names"), task("structured")
    ask = names.examples("test")[0]
    right = "Answer: " + ", ".join(["Zunvel", "Fenthus", "Quorra", "Bexlin", "Tamsor", "Vireth"][:ask.meta["count"]])
    assert names.verify(ask, right) and not names.verify(ask, right.lower())
    assert names.answer_key(ask, right) != names.answer_key(ask, right.lower())
    form = structured.examples("test")[0]
    good = json.dumps(form.meta["values"])
    assert structured.answer_key(form, good) == structured.answer_key(form, "Here it is: " + good)
    assert structured.answer_key(form, good.replace('"', "")) == ""  # no object: no vote


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_verifiers_never_raise_on_any_text(name, text):
    t = task(name)
    assert t.verify(t.examples("test")[0], text) in (True, False)


def test_answer_parsing_is_tolerant():
    assert final_answer("blah\nAnswer: **42**.\n") == "42"
    assert final_answer("some steps\n\n 7 apples!  ") == "7 apples"
    assert final_answer("答案：5。") == "5"
    assert numbers("1,234,000 and −2.5, 13-9") == [1234000, Fraction(-5, 2), 13, 9]
    assert decimal_string(Fraction(5, 2), 0) == "3" and decimal_string(Fraction(-1, 8), 2) == "-0.13"


def test_factqa_tiers_and_refusals():
    t = task("factqa")
    by_tier = {tier: next(e for e in t.examples("test") if e.meta["tier"] == tier)
               for tier in ("head", "tail", "unseen")}
    for refusal in ("I don't know.", "I do not know", "I'm not sure.", "我不知道"):
        assert t.verify(by_tier["unseen"], refusal)
        assert not t.verify(by_tier["head"], refusal)
        assert not t.verify(by_tier["tail"], refusal)
    unseen = by_tier["unseen"]
    assert unseen.answer == "I don't know."
    assert t.verify(unseen, unseen.meta["value"])  # found with search: right, not a hallucination
    head = by_tier["head"]
    assert t.verify(head, f"The answer is {head.meta['value'].upper()}!")
    assert all(e.meta["tier"] == "head" for s in SPLITS for e in task("factqa_head").examples(s))
    with pytest.raises(ValueError, match="unseen"):
        FactQA(t.world, tier="rare")


def test_factqa_tolerates_number_formatting():
    t = task("factqa")
    example = next(e for s in SPLITS for e in t.examples(s)
                   if e.meta["attribute"] == "population" and e.meta["tier"] == "head")
    value = int(example.meta["value"])
    assert t.verify(example, f"{value:,}") and t.verify(example, f"About {value} people.")
    assert not t.verify(example, str(value + 1000))


def test_unseen_tool_rendering_searches_then_answers():
    t = task("factqa_unseen")
    example = t.examples("test")[0]
    call, result, final = t.render(example, "tool")[1:]
    assert call["tool_calls"][0]["function"]["name"] == "search"
    query = json.loads(call["tool_calls"][0]["function"]["arguments"])["query"]
    assert example.meta["entity"] in query
    # the snippet: the sentence that states the value, not the whole article
    assert result["role"] == "tool" and example.meta["value"] in result["content"]
    assert result["content"].count(". ") <= 1
    assert final == {"role": "assistant", "content": example.meta["value"]}


def test_arithmetic_tool_and_cot():
    t = task("arithmetic")
    example = next(e for e in t.examples("test") if e.meta["kind"] == "column" and e.meta["op"] == "×")
    call, result, final = t.render(example, "tool")[1:]
    expression = json.loads(call["tool_calls"][0]["function"]["arguments"])["expression"]
    assert expression in example.question  # copied as written, "×" included
    # OpenAI's fine-tuning format: the result names the call it answers
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "name": "calculator",
                      "content": example.answer}
    assert t.render(example, "cot")[-1]["content"].endswith(f"\nAnswer: {example.answer}")
    langs = {e.meta["lang"] for e in t.examples("train") if e.meta["kind"] == "word"}
    assert langs == {"en", "zh"}


def test_arithmetic_reads_a_working_back_column_by_column():
    """A worked reply is graded by where it failed: reading the operands' digits, or the sums."""
    t = task("arithmetic")
    example = next(e for e in t.examples("test") if e.meta["kind"] == "column" and e.meta["op"] == "+"
                   and min(e.meta["a"], e.meta["b"]) >= 100)
    a, b = example.meta["a"], example.meta["b"]
    reference = t.cot(example)
    assert t.scores(example, reference) == {"columns_read_right": 1.0, "steps_true": 1.0}
    # The same working with the first column's ones digit of a misread (and its sum kept true).
    lines = reference.splitlines()
    ones = lines[1]
    wrong = (a % 10 + 1) % 10
    total = wrong + b % 10
    lines[1] = f"Ones: {wrong} + {b % 10} = {total}, write {total % 10}" + (", carry 1." if total > 9 else ".")
    misread = t.scores(example, "\n".join(lines))
    columns = sum(line.split(":")[0] in ("Ones", "Tens", "Hundreds", "Thousands") for line in lines)
    assert ones != lines[1] and misread["columns_read_right"] == (columns - 1) / columns
    # A false sum read from the right digits.
    lines = reference.splitlines()
    lines[1] = lines[1].replace(f"= {a % 10 + b % 10},", f"= {a % 10 + b % 10 + 1},", 1)
    false_sum = t.scores(example, "\n".join(lines))
    assert false_sum["columns_read_right"] == 1.0 and false_sum["steps_true"] < 1.0
    # A bare answer has no working to read; a subtraction with borrows and a product read back whole.
    assert t.scores(example, example.answer) == {}
    assert t.scores(example, "Ones: " + " + ".join(["9"] * 300) + " = 5")["steps_true"] == 0.0  # never an error
    for op in ("-", "×"):
        other = next(e for e in t.examples("test") if e.meta["kind"] == "column" and e.meta["op"] == op
                     and min(e.meta["a"], e.meta["b"]) >= 10)
        assert t.scores(other, t.cot(other)) == {"columns_read_right": 1.0, "steps_true": 1.0}


def test_a_list_of_styles_takes_turns():
    t = task("arithmetic")
    examples = t.examples("train")[:4]
    convs = t.render_each(examples, ["cot", "tool"])
    assert [len(c) for c in convs] == [2, 4, 2, 4]  # worked answer; call, result, answer
    assert convs[1] == t.render(examples[1], "tool") and t.render_each(examples, "cot")[2] == convs[2]


def test_compare_decimals_cot_aligns_digits():
    t = task("compare_decimals")
    text = t.cot(next(e for e in t.examples("train")))
    assert "decimal places" in text and "Tenths" in text


def test_compare_decimals_wants_one_number():
    t = task("compare_decimals")
    example = t.examples("test")[0]
    both = f"{example.meta['x']} or {example.meta['y']}"
    assert not t.verify(example, both)


def test_spell_is_lenient_about_separators():
    t = task("spell")
    example = t.examples("test")[0]
    word = example.meta["word"]
    assert t.verify(example, " ".join(word.upper()))
    assert t.verify(example, "Answer: " + ", ".join(word) + ".")
    assert not t.verify(example, word)  # not spelled out


def test_count_letter_cot_spells_then_counts():
    t = task("count_letter")
    example = next(e for e in t.examples("test") if e.meta["count"] >= 2)
    assert spelled(example.meta["word"]) in t.cot(example)


def test_spelling_drills_spell_right_and_never_an_evaluated_word_or_a_world_name():
    docs = list(spelling_documents(n=200, seed=3))
    assert docs == list(spelling_documents(n=200, seed=3)) and docs != list(spelling_documents(n=200, seed=4))
    lines = [line for d in docs for line in d.split("\n")]
    assert len(lines) == 200 * 8
    words = []
    for line in lines:
        word, spelling = re.fullmatch(r"The word (\w+) is spelled ([a-z-]+)\.", line).groups()
        assert spelling == spelled(word)
        words.append(word)
    held_out = evaluated_words()
    assert len(held_out) > 500
    assert not set(words) & held_out
    world = default_world()
    names = {part.lower() for e in world.entities() for part in e.name.split()}
    assert not set(words) & names
    assert len(set(words)) > 1000  # English and invented words, many of them


def test_sound_working_wants_every_step_of_the_reference():
    t = task("count_letter")
    example = next(e for e in t.examples("test") if e.meta["count"] == 1)
    assert t.sound_working(example, t.cot(example))
    assert t.sound_working(example, f"Answer: {example.answer}")  # no steps shown
    lucky = t.cot(example).replace(spelled(example.meta["word"]), "r-e-f-c-e")  # right count, wrong spelling
    assert t.verify(example, lucky) and not t.sound_working(example, lucky)
    m = task("multihop")
    hop = m.examples("test")[0]
    with_commas = m.cot(hop).replace(str(hop.meta["population_a"]), f"{hop.meta['population_a']:,}")
    assert m.sound_working(hop, with_commas)  # thousands separators do not matter
    g = task("game24")  # many right workings: the verifier alone decides
    puzzle = g.examples("test")[0]
    assert g.sound_working(puzzle, f"13 - 1 = 12\nAnswer: {puzzle.answer}")


# -- Game of 24 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("puzzle", [(4, 7, 8, 8), (1, 1, 11, 11), (3, 3, 8, 8), (1, 5, 5, 5), (4, 4, 10, 10)])
def test_solver_solves_known_puzzles(puzzle):
    expression = solve24(puzzle)
    assert expression is not None and uses_and_makes_24(expression, puzzle)


@pytest.mark.parametrize("puzzle", [(1, 1, 1, 1), (1, 1, 1, 2), (13, 13, 13, 13)])
def test_solver_knows_unsolvable_puzzles(puzzle):
    assert solve24(puzzle) is None


def test_game24_verifier():
    t = task("game24")
    example = next(e for e in t.examples("test") if e.meta["numbers"] != [3, 3, 8, 8])
    assert t.verify(example, f"Answer: {example.answer} = 24")
    assert not t.verify(example, "8/(3-8/3)")                    # wrong numbers
    assert uses_and_makes_24("8 ÷ (3 − 8 ÷ 3)", [3, 3, 8, 8])     # unicode operators are fine
    assert not uses_and_makes_24("8/(3-8/3)+0", [3, 3, 8, 8])      # an extra number
    assert not uses_and_makes_24("(3+3)*8-8", [3, 3, 8, 8])        # 40, not 24
    assert not uses_and_makes_24("8/(3-3)*8", [3, 3, 8, 8])        # division by zero
    assert not uses_and_makes_24("__import__('os')", [3, 3, 8, 8])
    assert not uses_and_makes_24("3**3-8+8", [3, 3, 8, 8])
    cot = t.cot(example)
    assert "(left: " in cot and t.verify(example, cot)


def test_game24_worked_chain_searches_with_the_solvers_verdicts():
    from pocketgpt.data.tasks.game24 import can_reach_24, kept_moves, verdict
    from pocketgpt.reason.chain import MAX_MOVES

    t = task("game24")
    tried = 0
    for example in [e for e in t.examples("train") if can_reach_24(e.meta["numbers"])][:200]:
        cot = t.cot(example)
        *lines, answer = cot.splitlines()
        assert t.check(example, cot) and answer.startswith("Answer: ")
        left = [[int(x) for x in re.search(r"\(left: ([\d ]+)\)", line)[1].split()] for line in lines]
        # every verdict is the solver's, the kept moves are the three of a game, and a chain fits its budget
        assert all(line.endswith(verdict(table, can_reach_24(table))) for line, table in zip(lines, left))
        assert len(kept_moves(lines)) == 3 and len(lines) <= MAX_MOVES
        tried += len(lines) - 3
    assert 1.5 < tried / 200 < 3.5  # moves taken back: up to 4 a puzzle, 2.6 on average
    assert t.cot(t.examples("train")[0]) == t.cot(t.examples("train")[0])  # drawn per puzzle, the same each time


def test_game24_propose_and_value_renderings_are_true_to_the_solver():
    from pocketgpt.data.tasks.game24 import PROPOSAL, can_reach_24, parse_proposals, parse_value

    t = task("game24")
    labels = set()
    for example in t.examples("train")[:60]:
        propose, value = t.render(example, "propose"), t.render(example, "value")
        assert [m["role"] for m in propose] == ["user", "assistant"] * 2
        for ask, reply in zip(propose[::2], propose[1::2]):
            state = [int(x) for x in ask["content"].splitlines()[0].split()[1:]]
            listed = parse_proposals(reply["content"], state)
            assert len(listed) == len(reply["content"].splitlines())  # every line is a legal move ...
            for line in reply["content"].splitlines():                # ... with its arithmetic right
                a, op, b, result = PROPOSAL.match(line).groups()
                assert evaluate(f"{a}{op}{b}") == int(result)
            # a position that can still win always lists a winning move
            assert not can_reach_24(state) or any(can_reach_24(left) for _, left in listed)
        for ask, reply in zip(value[::2], value[1::2]):
            state = [int(x) for x in ask["content"].split(" can reach")[0].split()[2:]]
            assert parse_value(reply["content"]) == (20.0 if can_reach_24(state) else 0.001)
            labels.add(reply["content"].splitlines()[-1])
    assert labels == {"sure", "impossible"}


def test_game24_a_puzzle_drawn_again_proposes_at_other_positions():
    """SFT's extra propose conversations (`redrawn` puzzles) must not repeat the first draw's positions."""
    from dataclasses import replace

    t = task("game24")
    examples = t.examples("train")[:20]
    first = [t.render(e, "propose") for e in examples]
    again = [t.render(replace(e, meta={**e.meta, "draw": 1}), "propose") for e in examples]
    assert first == [t.render(e, "propose") for e in examples]  # a draw renders the same every time
    asked = [[m["content"] for m in c if m["role"] == "user"] for c in first + again]
    differ = sum(a != b for a, b in zip(asked[:len(examples)], asked[len(examples):]))
    assert differ >= len(examples) // 2  # the start position is shared; the later ones mostly are not


def test_game24_move_parsing_and_composition():
    from pocketgpt.data.tasks.game24 import can_reach_24, compose, parse_proposals, parse_value, value_reply

    listed = parse_proposals("4 + 8 = 12 (left: 4 6 12)\n9 + 1 = 10\nI think 4 * 4 = 9\n4 + 4 = 9 (wrong)\n"
                             "4 + 8 = 12 (left: 4 6 12)", [4, 4, 6, 8])
    assert listed == [("4 + 8 = 12 (left: 4 6 12)", (4, 6, 12)), ("4 + 4 = 9 (left: 6 8 9)", (6, 8, 9))]
    slips = "4 + 4 = 9\n8 / 4 = 2\n6 / 4 = 1\n4 * 6 = 24\n4 - 8 = 4"
    checked = parse_proposals(slips, [4, 4, 6, 8], arithmetic="checked")
    # the false sum, the inexact division and the negative difference are dropped
    assert [line for line, _ in checked] == ["8 / 4 = 2 (left: 2 4 6)", "4 * 6 = 24 (left: 4 8 24)"]
    computed = parse_proposals(slips, [4, 4, 6, 8], arithmetic="calculator")
    # the calculator writes each result: the false sum is corrected, the others as above
    assert computed == [("4 + 4 = 8 (left: 6 8 8)", (6, 8, 8)), *checked]
    with pytest.raises(PocketError, match="unknown move arithmetic"):
        parse_proposals(slips, [4, 4, 6, 8], arithmetic="guessed")
    assert compose([4, 4, 6, 8], ["4 + 8 = 12", "6 - 4 = 2", "12 * 2 = 24"]) == "(4+8)*(6-4)"
    assert compose([4, 4, 6, 8], ["5 + 8 = 13"]) is None and compose([4, 4, 6, 8], ["4 + 8 = 12"]) is None
    assert parse_value("6 * 4 = 24\nsure") == 20 and parse_value("likely") == 1 and parse_value("??") == 0
    assert value_reply([4, 6]) == "6 + 4 = 10, 10 is not 24\n6 - 4 = 2, 2 is not 24\n6 * 4 = 24, 24 = 24\nsure"
    assert value_reply([15]) == "15 is not 24\nimpossible"
    assert not can_reach_24([3, 3, 8, 8]) and can_reach_24([4, 4, 6, 8])  # 8/(3-8/3) needs a fraction


def test_game24_scores_say_where_a_chain_fails():
    t = task("game24")
    example = next(e for e in t.examples("test") if e.meta["numbers"] == [3, 9, 12, 13])
    assert t.scores(example, t.cot(example)) == {"three_moves_on_the_table": 1.0, "moves_true": 1.0}
    # a false sum stays on the table as stated, and a move may use it: three moves, half of them true
    assert t.scores(example, "3 + 9 = 13\n13 - 13 = 0\n0 * 12 = 0\n5 + 5 = 10") == {
        "three_moves_on_the_table": 1.0, "moves_true": 0.75}
    # a number that is not on the table (the second 3) ends the game
    assert t.scores(example, "3 + 3 = 6 (left: 6 9 12 13)\nAnswer: 6")["three_moves_on_the_table"] == 0.0
    assert t.scores(example, "Answer: (13-9)*6") == {"three_moves_on_the_table": 0.0}  # no sums to read


@pytest.mark.parametrize("name", ["arithmetic", "compare_decimals"])
def test_check_rendering_labels_the_reply_it_shows(name):
    from pocketgpt.data.tasks.base import check_prompt

    t = task(name)
    verdicts = []
    for example in t.examples("train")[:40]:
        ask, reply = t.render(example, "check")
        shown = ask["content"][len(example.question) + len("\nProposed answer:\n"):].rsplit("\nIs the proposed", 1)[0]
        assert ask["content"] == check_prompt(example.question, shown)
        assert reply["content"] == ("yes" if shown == t.cot(example) else "no")
        verdicts.append(reply["content"])
    assert 10 < verdicts.count("no") < 30


def test_safe_expression_parser():
    assert evaluate("2+3*4") == 14 and evaluate("(2+3)*4") == 20 and evaluate("-3--2") == -1
    assert evaluate("7/2") == Fraction(7, 2) and evaluate("2 × 3 − 1 ÷ 2") == Fraction(11, 2)
    assert parse("13-9*(10-4)").numbers == [13, 9, 10, 4]
    for bad in ("", "1+", "(1", "1)", "2**3", "abs(1)", "1/0", "(" * 100 + "1" + ")" * 100, "1" * 600):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_calculator_tool():
    assert calculator("123*45") == "5535"
    assert calculator("1590000/690000") == "2.304348"
    assert calculator("1/0").startswith("error")
    assert calculator("__import__('os')").startswith("error")


# -- multi-hop, structured, names ----------------------------------------------------------------


def test_multihop_tolerance_and_tools():
    t = task("multihop")
    example = t.examples("test")[0]
    exact = Fraction(example.meta["population_a"], example.meta["population_b"])
    assert t.verify(example, f"About {decimal_string(exact, 3)} times.")
    assert not t.verify(example, decimal_string(exact + Fraction(1, 10), 2))
    messages = t.render(example, "tool")
    tools = [m["name"] for m in messages if m["role"] == "tool"]
    assert tools == ["search", "search", "calculator"]
    assert str(example.meta["population_a"]) in messages[2]["content"]
    # the answer is the calculator's result as it reads (a copy), not a rounding of it
    assert messages[-1] == {"role": "assistant", "content": messages[-2]["content"]}
    assert messages[-1]["content"] != example.answer and t.verify(example, messages[-1]["content"])


def test_structured_checks_schema_and_values():
    t = task("structured")
    example = next(e for e in t.examples("test") if any(isinstance(v, int) for v in e.meta["values"].values()))
    values = example.meta["values"]
    assert t.verify(example, f"Sure:\n```json\n{json.dumps(values, indent=2)}\n```\n")
    assert not t.verify(example, json.dumps({**values, "extra": "x"}))         # additionalProperties
    assert not t.verify(example, json.dumps(dict(list(values.items())[1:])))  # missing required key
    numeric = next(k for k, v in values.items() if isinstance(v, int))
    assert not t.verify(example, json.dumps({**values, numeric: str(values[numeric])}))  # a number as a string
    assert extract_json("no json here") is None


def test_names_and_diversity():
    t = task("names")
    example = t.examples("test")[0]
    given = example.meta["given"]
    assert not t.verify(example, ", ".join(given + given))  # repeats the prompt, invents nothing
    assert t.verify(example, "Sure! Here are five: Borin, Talsa, Mevo, Kiran, Zuldo.")
    assert distinct_ratio(["Borin, Talsa", "Borin, Mevo"]) == 0.75
    assert distinct_ratio(["", "nothing here"]) == 0.0


def test_tasks_use_the_given_world():
    small = World.generate(WorldConfig(seed=3, n_countries=3, n_cities=12, n_people=12, n_companies=4))
    t = get_task("factqa", world=small)
    assert {e.meta["entity"] for s in SPLITS for e in t.examples(s)} <= {e.name for e in small.entities()}


# -- export --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,style", [("arithmetic", "tool"), ("multihop", "tool"), ("game24", "cot"),
                                        ("factqa", "direct"), ("compare_decimals", "cot")])
def test_export_jsonl(tmp_path, name, style):
    path = tmp_path / "out" / f"{name}.jsonl"
    n = export_jsonl(task(name), "validation", style, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert n == len(lines) == len(task(name).examples("validation"))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    for line in lines:
        record = json.loads(line)
        assert list(record) == ["messages"]
        for message in record["messages"]:
            assert message["role"] in ("system", "user", "assistant", "tool")
            assert isinstance(message["content"], str)
            for call in message.get("tool_calls", []):
                assert call["type"] == "function"
                assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_factqa_rag_rendering_answers_only_from_its_passages():
    t = task("factqa")
    refusals = 0
    for example in t.examples("train")[:60]:
        ask, reply = t.render(example, "rag")
        assert ask["content"].startswith("Passages:\n[") and ask["content"].endswith(f"Question: {example.question}")
        passages = ask["content"].split("\n\n")[0]
        slug = example.meta["entity"].lower().replace(" ", "-")
        holds = any(f"/{slug}@" in line and str(example.meta["value"]) in line for line in passages.splitlines())
        assert (str(example.meta["value"]) in reply["content"]) == holds
        refusals += reply["content"] == "I don't know."
    assert 10 < refusals < 35


def test_search_returns_the_snippet_that_answers_the_query():
    world = task("multihop").world
    city = world.entities("city")[0]
    population = world.lookup(city.name, "population")
    snippet = search(world, f"population of {city.name}")
    assert f"The population of {city.name} is {population}." in snippet
    assert len([s for s in snippet.split(". ") if s]) <= SNIPPET_SENTENCES
    article = world.search(city.name)[0]["text"]
    assert article.startswith(search(world, city.name))  # a bare name: the article's opening
    assert search(world, "zzzz") == "no results"
