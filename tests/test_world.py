"""The synthetic world and the worked-arithmetic source: determinism, consistency, tiers."""

import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from pocketgpt.data import world as world_module
from pocketgpt.data.mathtext import OPS, apply, calculator_drill, fact_documents, math_documents, worked_steps
from pocketgpt.data.tasks.tools import calculator
from pocketgpt.data.world import ATTRIBUTE, TIERS, World, WorldConfig


@pytest.fixture(scope="module")
def world():
    return World.generate(WorldConfig())


def test_generation_is_deterministic_per_seed(world):
    again = World.generate(WorldConfig())
    assert again.facts == world.facts
    assert again.pretraining_documents() == world.pretraining_documents()
    assert again.retrieval_corpus() == world.retrieval_corpus()


def test_generation_differs_across_seeds(world):
    other = World.generate(WorldConfig(seed=1))
    assert {e.name for e in other.entities()} != {e.name for e in world.entities()}
    assert other.pretraining_documents() != world.pretraining_documents()


def test_default_size(world):
    cfg = world.config
    counts = Counter(e.kind for e in world.entities())
    assert counts == {"country": cfg.n_countries, "city": cfg.n_cities, "person": cfg.n_people,
                      "company": cfg.n_companies}
    assert {f.tier for f in world.facts} == set(TIERS)
    per_kind = Counter(a.kind for a in ATTRIBUTE.values())
    assert len(world.facts) == sum(per_kind[e.kind] for e in world.entities())
    assert 100_000 < sum(len(d.text) for d in world.documents()) < 3_000_000


def test_names_are_unique_down_to_the_word(world):
    names = [e.name for e in world.entities()]
    assert len(names) == len(set(names))
    words = [w.lower() for e in world.entities() for w in e.name.split()
             if w not in world_module.COMPANY_SUFFIXES]
    assert len(words) == len(set(words))
    assert all(re.fullmatch(r"[A-Z][a-z]+", w) for n in names for w in n.split())


def test_attributes_are_consistent(world):
    kind = {e.name: e.kind for e in world.entities()}
    look = world.lookup
    for country in world.entities("country"):
        capital = look(country.name, "capital")
        assert kind[capital] == "city" and look(capital, "country") == country.name
        own = sum(int(look(c.name, "population")) for c in world.entities("city")
                  if look(c.name, "country") == country.name)
        assert int(look(country.name, "population")) >= own
    for city in world.entities("city"):
        assert kind[look(city.name, "country")] == "country"
        assert kind[look(city.name, "mayor")] == "person"
        population = look(city.name, "population")  # a plain positive integer, as verifiers parse it
        assert population == str(int(population)) and int(population) > 0
    for person in world.entities("person"):
        assert kind[look(person.name, "birth_city")] == "city"
    for company in world.entities("company"):
        founder = look(company.name, "founder")
        assert kind[founder] == "person"
        assert int(look(founder, "birth_year")) < int(look(company.name, "founded"))
        assert kind[look(company.name, "headquarters")] == "city"


def test_a_fact_is_as_rare_as_the_rarest_entity_it_names(world):
    tier = {e.name: e.tier for e in world.entities()}
    for f in world.facts:
        named = [tier[f.entity]] + ([tier[f.value]] if f.value in tier else [])
        assert f.tier == max(named, key=TIERS.index)


def test_lookup_and_fact_table_agree(world):
    table = world.fact_table()
    assert len(table) == len(world.facts)
    assert all(world.lookup(e, a) == v for (e, a), v in table.items())
    with pytest.raises(KeyError):
        world.lookup("Nobody", "capital")


def test_unseen_names_never_appear_in_pretraining(world):
    text = "\n".join(d.text for d in world.documents())
    unseen = world.entities(tier="unseen")
    assert unseen
    for entity in unseen:
        assert not re.search(rf"\b{re.escape(entity.name)}\b", text), entity.name


def test_mentions_follow_the_tiers(world):
    cfg = world.config
    mentions = Counter(f for doc in world.documents() for f in doc.facts)
    for fact in world.facts:
        if fact.tier == "head":
            assert mentions[fact] >= cfg.head_mentions
        elif fact.tier == "tail":
            assert 1 <= mentions[fact] <= cfg.tail_mentions
        else:
            assert mentions[fact] == 0
    # Each document really states the facts it claims to.
    for doc in random.Random(0).sample(world.documents(), 200):
        for f in doc.facts:
            assert f.entity in doc.text
            assert f.value in doc.text or f"{int(f.value):,}" in doc.text


def test_documents_come_in_varied_formats(world):
    docs = world.pretraining_documents()
    texts = [d for d in docs if isinstance(d, str)]
    assert any(d.startswith("Q: ") for d in texts)
    assert any("|---|---|" in d for d in texts)
    assert any(d.startswith("# ") for d in texts)
    assert any("\n- " in d for d in texts)
    # Chat logs: a user asks, the assistant answers with the fact.
    chats = [d for d in docs if isinstance(d, list)]
    assert chats and all([m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2) for c in chats)


def test_retrieval_corpus_covers_every_entity(world):
    corpus = world.retrieval_corpus()
    assert sorted(a["title"] for a in corpus) == sorted(e.name for e in world.entities())
    assert len({a["id"] for a in corpus}) == len(corpus)
    article = {a["title"]: a["text"] for a in corpus}
    for f in world.facts:  # unseen facts included
        assert f.value in article[f.entity]


def test_passages_are_whole_sentences_that_cover_every_article(world):
    """Three whole sentences each, starting every two: every sentence, so every fact, is in a passage."""
    for article in world.retrieval_corpus():
        passages = world.passages(article["title"])
        assert passages and all(p["article"] == article["id"] and p["id"].startswith(article["id"] + "@")
                                for p in passages)
        for p in passages:
            assert p["text"] in article["text"] and p["text"].endswith(".")
            assert 1 <= p["text"].count(". ") + 1 <= 3
        assert " ".join(p["text"] for p in passages[::2]).startswith(article["text"][:40])
        facts = [f for f in world.facts if f.entity == article["title"]]  # every article is an entity's
        assert facts and all(any(f.value in p["text"] for p in passages) for f in facts)
    assert len({p["id"] for p in world.passages()}) == len(world.passages())


def test_search_finds_the_entity(world):
    for entity in world.entities(tier="unseen"):
        assert world.search(f"Tell me about {entity.name}")[0]["title"] == entity.name
    assert world.search("zzzz") == []


def test_small_worlds_work():
    tiny = World.generate(WorldConfig(n_countries=1, n_cities=1, n_people=1, n_companies=1))
    assert len(tiny.entities()) == 4
    empty = World.generate(WorldConfig(n_countries=0, n_cities=0, n_people=0, n_companies=0))
    assert empty.facts == [] and empty.pretraining_documents() == []


@pytest.mark.parametrize("overrides", [
    {"n_people": 10**6},                                    # more names than the syllables make
    {"head_fraction": 0.7, "tail_fraction": 0.5},           # fractions sum past 1
    {"head_fraction": -0.1},
    {"n_countries": 0},                                     # cities with nowhere to be
    {"n_countries": 50, "n_cities": 40},                    # not enough capitals
    {"n_people": 0},                                        # cities without mayors
    {"n_cities": 0, "n_countries": 0},                      # people born nowhere
    {"tail_mentions": 0},
    {"n_companies": -1},
])
def test_unsatisfiable_config_raises_before_generating(overrides, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generation started")
    monkeypatch.setattr(world_module, "make_names", fail)
    with pytest.raises(ValueError):
        World.generate(WorldConfig(**overrides))


# ---------------------------------------------------------------------------------------------
# mathtext


def test_math_documents_are_deterministic_and_bilingual():
    docs = math_documents(200, seed=0)
    assert docs == math_documents(200, seed=0)
    assert docs != math_documents(200, seed=1)
    assert any("carry" in d for d in docs) and any("borrow" in d for d in docs)
    assert any("答案" in d for d in docs) and any("Answer:" in d for d in docs)


def test_calculator_drills_copy_and_compute_exactly():
    drill = calculator_drill(random.Random(0), lines=50)
    for line in drill.splitlines()[1:]:
        m = re.fullmatch(r"(\d+) ([-+×]) (\d+): type (\d+)([-+*])(\d+), the calculator shows (-?\d+), "
                         r"so (\d+) ([-+×]) (\d+) = (-?\d+)\.", line)
        a, op, b = int(m[1]), m[2], int(m[3])
        assert (int(m[4]), int(m[6]), int(m[8]), int(m[10])) == (a, b, a, b) and m[9] == op
        assert m[5] == ("*" if op == "×" else op)
        assert int(m[7]) == int(m[11]) == apply(a, op, b) == int(calculator(f"{m[4]}{m[5]}{m[6]}"))


def test_number_facts_are_true_and_cover_both_notations():
    docs = fact_documents(300, seed=0)
    assert docs == fact_documents(300, seed=0) != fact_documents(300, seed=1)
    exact = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "*": lambda a, b: a * b,
             "÷": lambda a, b: Fraction(a, b), "/": lambda a, b: Fraction(a, b)}
    symbols, column_steps = set(), 0
    for doc in docs:
        header, *facts = doc.splitlines()
        assert len(facts) == 12 and not re.search(r"\d", header)
        for line in facts:
            m = re.fullmatch(r"(\d+) ([-+×÷*/]) (\d+)(?: \+ (\d))? = (\d+)", line)
            assert m, line
            a, op, b, carry = int(m[1]), m[2], int(m[3]), int(m[4] or 0)
            assert a >= b or m[4], line  # larger operand first, as the Game of 24 writes a move
            assert exact[op](a, b) + carry == int(m[5]), line
            symbols.add(op)
            column_steps += bool(m[4])
        assert not ({"×", "÷"} & set(doc) and {"*", "/"} & set(doc))  # one notation per drill
    assert symbols == set(exact) and column_steps > 0


def test_worked_steps_reach_the_right_result():
    rng = random.Random(0)
    for _ in range(300):
        a, b, op = rng.randint(0, 99999), rng.randint(0, 9999), rng.choice(OPS)
        steps = worked_steps(a, op, b)
        assert steps[-1] == f"So {a} {op} {b} = {apply(a, op, b)}."


def test_column_steps_show_carries():
    steps = worked_steps(487, "+", 356)
    assert "Ones: 7 + 6 = 13, write 3, carry 1." in steps
    assert any("carry" in s for s in worked_steps(487, "×", 356))


# ----------------------------------------------------------------------------- the world of a run


@pytest.fixture()
def default_world_afterwards():
    from pocketgpt.data.tasks import use_world

    yield
    use_world(WorldConfig())  # the active world is process-wide: leave the default for the other tests


def test_a_run_records_one_world_and_refuses_another(tmp_path):
    from pocketgpt.common import PocketError
    from pocketgpt.data.world import read_run_world, record_run_world

    assert read_run_world(tmp_path) is None
    record_run_world(tmp_path, WorldConfig(seed=7))
    record_run_world(tmp_path, WorldConfig(seed=7))  # the same world again: fine
    assert read_run_world(tmp_path) == WorldConfig(seed=7)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    assert read_run_world(tmp_path / "sft") == WorldConfig(seed=7)  # a model directory finds its run's
    assert read_run_world(tmp_path / "another_run") is None  # a run inside a run's folder does not
    with pytest.raises(PocketError, match="cannot switch"):
        record_run_world(tmp_path, WorldConfig(seed=8))
    (tmp_path / "world.json").write_text('{"seed": 1, "planets": 3}')
    with pytest.raises(PocketError, match="not a world configuration"):
        read_run_world(tmp_path)


def test_tasks_follow_the_active_world(default_world_afterwards):
    from pocketgpt.data.tasks import default_world, get_task, use_world

    default_names = {e.name for e in default_world().entities()}
    default_question = get_task("factqa_head").examples("test")[0].question
    use_world(WorldConfig(seed=5))
    other = {e.name for e in default_world().entities()}
    assert other == {e.name for e in World.generate(WorldConfig(seed=5)).entities()} != default_names
    question = get_task("factqa_head").examples("test")[0].question
    assert question != default_question and any(name in question for name in other)
    use_world(WorldConfig())
    assert get_task("factqa_head").examples("test")[0].question == default_question


def test_a_command_on_a_run_uses_the_run_world(tmp_path, default_world_afterwards):
    from pocketgpt.cli import main
    from pocketgpt.data.tasks import default_world
    from pocketgpt.data.world import record_run_world

    record_run_world(tmp_path, WorldConfig(seed=9))
    main(["info", str(tmp_path)])
    assert {e.name for e in default_world().entities()} == {e.name for e in World.generate(WorldConfig(seed=9)).entities()}
