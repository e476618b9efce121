"""A seeded fictional encyclopedia: the synthetic world pocketgpt learns.

A tiny model cannot learn the internet, but it can learn a small world completely. From one seed
we invent countries, cities, people and companies, tie them together with mutually consistent
attributes (a city lies in a country that exists, a company's founder was born before it was
founded...), and write about them.

Every entity gets a frequency tier, and that tier decides how often its facts are written down:
- head:   stated in many documents, in varied phrasings (a model should memorise these);
- tail:   stated once or twice (a model half-knows these: hallucination lives here);
- unseen: never in pretraining, only in the retrieval corpus (closed book must say "I don't know").

A fact is only as visible as the rarest entity it names: "the mayor of Dorin is Kalo Vesin" is an
unseen fact if Kalo Vesin is unseen, so an unseen name can never leak into pretraining text.

    world = generate_world(WorldConfig(seed=0))
    world.lookup("Dorin", "population")    # '1234000'
    world.pretraining_documents()          # list[str], head facts many times, unseen never
    world.retrieval_corpus()               # one article per entity, all tiers
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from ..errors import PocketError

TIERS = ("head", "tail", "unseen")
KINDS = ("country", "city", "person", "company")

# ---------------------------------------------------------------------------------------------
# Names: two syllables of consonant + vowel + optional soft coda ("Dorin", "Velmo", "Tasrel").
# Single-consonant onsets keep clusters to at most two consonants, so every name is pronounceable.


ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "n", "r", "l", "s")
SYLLABLES = tuple(o + v + c for o in ONSETS for v in VOWELS for c in CODAS)
NAME_CAPACITY = len(SYLLABLES) ** 2  # how many distinct words the generator can make


def make_names(rng: random.Random, n: int, reserved: frozenset[str] = frozenset()) -> list[str]:
    """n distinct capitalised two-syllable words, none of them (lowercased) in `reserved`.

    Sampling indices without replacement makes uniqueness free and keeps the cost linear in n,
    even when n is close to the generator's capacity.
    """
    want = min(NAME_CAPACITY, n + len(reserved))
    names = []
    for index in rng.sample(range(NAME_CAPACITY), want):
        first, second = divmod(index, len(SYLLABLES))
        word = (SYLLABLES[first] + SYLLABLES[second]).capitalize()
        if word.lower() not in reserved:
            names.append(word)
    if len(names) < n:
        raise PocketError(f"cannot make {n} distinct names (capacity {NAME_CAPACITY})")
    return names[:n]


# ---------------------------------------------------------------------------------------------
# Attributes: what can be said about each kind of entity, and the phrasings used to say it.


@dataclass(frozen=True)
class Attribute:
    kind: str                    # the kind of entity this attribute describes
    name: str                    # key in the fact table, e.g. "population"
    label: str                   # table column / infobox key, e.g. "Population"
    questions: tuple[str, ...]   # ways to ask, "{e}" is the entity
    statements: tuple[str, ...]  # ways to state, "{e}" entity, "{v}" value; the first is canonical
    numeric: bool = False


ATTRIBUTES = (
    Attribute("country", "capital", "Capital",
              ("What is the capital of {e}?", "Which city is the capital of {e}?"),
              ("The capital of {e} is {v}.", "{v} is the capital of {e}.",
               "{e} is governed from its capital, {v}.")),
    Attribute("country", "region", "Region",
              ("In which region is {e}?", "Where does {e} lie?"),
              ("{e} lies in {v}.", "{e} is a country in {v}.", "The country of {e} is part of {v}.")),
    Attribute("country", "currency", "Currency",
              ("What is the currency of {e}?", "Which money is used in {e}?"),
              ("The currency of {e} is the {v}.", "People in {e} pay with the {v}.",
               "{e} uses the {v} as its currency.")),
    Attribute("country", "population", "Population",
              ("What is the population of {e}?", "How many people live in {e}?"),
              ("The population of {e} is {v}.", "{e} has a population of {v}.",
               "About {v} people live in {e}."), numeric=True),
    Attribute("city", "country", "Country",
              ("In which country is {e}?", "Which country is {e} in?"),
              ("{e} is a city in {v}.", "The city of {e} lies in {v}.", "{e} belongs to {v}.")),
    Attribute("city", "population", "Population",
              ("What is the population of {e}?", "How many people live in {e}?"),
              ("The population of {e} is {v}.", "{e} has a population of {v}.",
               "About {v} people live in {e}."), numeric=True),
    Attribute("city", "founded", "Founded",
              ("In which year was {e} founded?", "When was {e} founded?"),
              ("{e} was founded in {v}.", "The city of {e} dates from {v}.",
               "{e} was established in the year {v}."), numeric=True),
    Attribute("city", "river", "River",
              ("Which river flows through {e}?", "On which river does {e} lie?"),
              ("{e} lies on the {v} river.", "The river {v} flows through {e}.",
               "{e} was built on the banks of the {v}.")),
    Attribute("city", "mayor", "Mayor",
              ("Who is the mayor of {e}?", "Who leads the city of {e}?"),
              ("The mayor of {e} is {v}.", "{v} is the mayor of {e}.", "{e} is led by its mayor, {v}.")),
    Attribute("person", "birth_year", "Born",
              ("In which year was {e} born?", "When was {e} born?"),
              ("{e} was born in {v}.", "{e} came into the world in {v}.",
               "The year {v} saw the birth of {e}."), numeric=True),
    Attribute("person", "birth_city", "Birthplace",
              ("In which city was {e} born?", "Where was {e} born?"),
              ("{e} was born in the city of {v}.", "{e} comes from {v}.", "{v} is the birthplace of {e}.")),
    Attribute("person", "occupation", "Occupation",
              ("What is the occupation of {e}?", "What does {e} do for a living?"),
              ("{e} works as a {v}.", "{e} is a {v} by trade.", "By profession, {e} is a {v}.")),
    Attribute("company", "founder", "Founder",
              ("Who founded {e}?", "Who is the founder of {e}?"),
              ("{e} was founded by {v}.", "{v} founded {e}.", "{v} is the founder of {e}.")),
    Attribute("company", "founded", "Founded",
              ("In which year was {e} founded?", "When was {e} founded?"),
              ("{e} was founded in {v}.", "{e} has been in business since {v}.",
               "{e} opened its doors in {v}."), numeric=True),
    Attribute("company", "headquarters", "Headquarters",
              ("Where is {e} headquartered?", "In which city is {e} based?"),
              ("{e} is headquartered in {v}.", "{e} has its head office in {v}.",
               "The headquarters of {e} are in {v}.")),
    Attribute("company", "product", "Product",
              ("What does {e} make?", "What is the main product of {e}?"),
              ("{e} makes {v}.", "{e} is known for its {v}.", "The main product of {e} is {v}.")),
)
ATTRIBUTE = {(a.kind, a.name): a for a in ATTRIBUTES}

OCCUPATIONS = ("baker", "teacher", "painter", "sailor", "doctor", "farmer", "poet", "merchant",
               "judge", "musician", "weaver", "potter", "carpenter", "builder")
PRODUCTS = ("tea", "bicycles", "glassware", "textiles", "lamps", "chocolate", "ships", "paper",
            "clocks", "soap", "rope", "pottery")
COMPANY_SUFFIXES = ("Works", "Trading", "Industries", "Mills", "Holdings", "Company")
PLURAL = {"country": "countries", "city": "cities", "person": "people", "company": "companies"}

# Fact-free sentences that open an article, so it reads like one.
INTROS = {
    "country": ("{e} is a country of the known world.", "{e} is a sovereign country."),
    "city": ("{e} is a city of the known world.", "{e} is a city with a long history."),
    "person": ("{e} is a notable person of the known world.", "{e} is a well-known figure."),
    "company": ("{e} is a company of the known world.", "{e} is a long-standing business."),
}
OUTLETS = ("The Morning Ledger", "The Courier", "The Evening Post", "World Gazette", "The Herald")


def _template_words() -> frozenset[str]:
    """Every word of our prose, so no invented name can collide with the text around it."""
    texts = [t for a in ATTRIBUTES for t in (a.label, *a.questions, *a.statements)]
    texts += [t for intros in INTROS.values() for t in intros] + list(OUTLETS) + list(PLURAL.values())
    texts += list(OCCUPATIONS + PRODUCTS + COMPANY_SUFFIXES + KINDS + TIERS)
    return frozenset(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))


RESERVED_WORDS = _template_words()

# ---------------------------------------------------------------------------------------------
# Configuration, entities and facts.


@dataclass
class WorldConfig:
    seed: int = 0
    n_countries: int = 8
    n_cities: int = 40
    n_people: int = 40
    n_companies: int = 20
    head_fraction: float = 0.6   # share of each kind's entities in the head tier
    tail_fraction: float = 0.2   # share in the tail tier; the rest is unseen
    head_mentions: int = 40      # documents stating each head fact
    tail_mentions: int = 2       # each tail fact is stated in 1..tail_mentions documents

    @property
    def n_rivers(self) -> int:
        return math.ceil(self.n_cities / 4)

    @property
    def n_regions(self) -> int:
        return math.ceil(self.n_countries / 3)

    @property
    def words_needed(self) -> int:
        """Distinct invented words: one per place/company/river/region/currency, two per person."""
        return (2 * self.n_countries + self.n_cities + 2 * self.n_people + self.n_companies
                + self.n_rivers + self.n_regions)

    def validate(self) -> None:
        """Raise ValueError if no world can satisfy this config (checked before generating)."""
        counts = {"n_countries": self.n_countries, "n_cities": self.n_cities,
                  "n_people": self.n_people, "n_companies": self.n_companies}
        for name, n in counts.items():
            if not isinstance(n, int) or n < 0:
                raise PocketError(f"{name} must be a non-negative integer, got {n!r}")
        if not (0 <= self.head_fraction <= 1 and 0 <= self.tail_fraction <= 1):
            raise PocketError("head_fraction and tail_fraction must lie in [0, 1]")
        if self.head_fraction + self.tail_fraction > 1:
            raise PocketError(f"head_fraction + tail_fraction = "
                             f"{self.head_fraction + self.tail_fraction} > 1")
        if not 1 <= self.tail_mentions <= self.head_mentions:
            raise PocketError("need 1 <= tail_mentions <= head_mentions")
        if self.n_cities and not self.n_countries:
            raise PocketError("cities need a country to lie in, but n_countries = 0")
        if self.n_countries > self.n_cities:
            raise PocketError(f"every country needs its own capital city: "
                             f"{self.n_countries} countries but {self.n_cities} cities")
        if self.n_cities and not self.n_people:
            raise PocketError("every city needs a mayor, but n_people = 0")
        if (self.n_people or self.n_companies) and not self.n_cities:
            raise PocketError("people need a birth city and companies a headquarters, but n_cities = 0")
        if self.n_companies and not self.n_people:
            raise PocketError("every company needs a founder, but n_people = 0")
        capacity = NAME_CAPACITY - len(RESERVED_WORDS)
        if self.words_needed > capacity:
            raise PocketError(f"this world needs {self.words_needed} distinct names but the syllable "
                             f"generator can only make {capacity}")


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # one of KINDS
    tier: str  # one of TIERS


@dataclass(frozen=True)
class Fact:
    entity: str
    kind: str
    attribute: str
    value: str  # always a string; numeric attributes hold plain digits, e.g. "1234000"
    tier: str


@dataclass(frozen=True)
class Document:
    """A pretraining document and the facts it states (so mention counts are checkable).
    A chat log also keeps its messages: the mixture renders those with the chat template."""
    text: str
    facts: tuple[Fact, ...]
    messages: tuple[dict, ...] = ()


def rarest(*tiers: str) -> str:
    return max(tiers, key=TIERS.index)


def _pick(rng: random.Random, pool: list[Entity], tier: str, same_tier: bool = False) -> Entity:
    """Choose a related entity, preferring one at least as visible as `tier` (or exactly `tier`).

    Preferring visible partners keeps a head entity's facts head: its mayor or founder is then a
    head person too, instead of an unseen one that would hide the fact from pretraining.
    """
    rank = TIERS.index(tier)
    preferred = [e for e in pool if e.tier == tier] if same_tier else []
    preferred = preferred or [e for e in pool if TIERS.index(e.tier) <= rank] or pool
    return rng.choice(preferred)


def show_value(value: str, numeric: bool, rng: random.Random) -> str:
    """Write a value the way a document might: large numbers with or without thousands commas."""
    if numeric and len(value) > 4 and rng.random() < 0.5:
        return f"{int(value):,}"
    return value


def _entity_document(facts: list[Fact], rng: random.Random) -> Document:
    """One document about one entity: an article, an infobox, a Q&A snippet, a chat log or a news item."""
    e, kind = facts[0].entity, facts[0].kind
    rng.shuffle(facts)
    attrs = [ATTRIBUTE[(f.kind, f.attribute)] for f in facts]
    shown = [show_value(f.value, a.numeric, rng) for a, f in zip(attrs, facts)]
    statements = [rng.choice(a.statements).format(e=e, v=v) for a, v in zip(attrs, shown)]
    fmt = rng.choice(("article", "infobox", "qa", "chat", "news"))
    if fmt == "article":
        heading = rng.choice((f"# {e}", f"{e}\n{'=' * len(e)}", f"{e} - Encyclopedia of the Known World"))
        text = f"{heading}\n\n{rng.choice(INTROS[kind]).format(e=e)} {' '.join(statements)}"
    elif fmt == "infobox":
        text = "\n".join([f"{e} ({kind})", *(f"{a.label}: {v}" for a, v in zip(attrs, shown))])
    elif fmt == "qa":
        # Answers are sometimes the bare value, sometimes a full sentence.
        text = "\n\n".join(f"Q: {rng.choice(a.questions).format(e=e)}\nA: {rng.choice((v, s))}"
                            for a, v, s in zip(attrs, shown, statements))
    elif fmt == "chat":
        # Someone asking an assistant about the entity: knowledge also lives in conversations, as on
        # the web's forums and chat logs, so a well-known fact is stated in the assistant's format too.
        messages = []
        for a, s in zip(attrs, statements):
            messages += [{"role": "user", "content": rng.choice(a.questions).format(e=e)},
                         {"role": "assistant", "content": s}]
        return Document("\n".join(m["content"] for m in messages), tuple(facts), tuple(messages))
    else:
        text = f"{rng.choice(OUTLETS)} - {' '.join(statements)}"
    return Document(text, tuple(facts))


def _attribute_document(facts: list[Fact], rng: random.Random) -> Document:
    """One document about one attribute of several entities: a markdown table or a list."""
    attr = ATTRIBUTE[(facts[0].kind, facts[0].attribute)]
    title = f"{attr.label} of {PLURAL[attr.kind]}"
    if rng.random() < 0.5:
        rows = [f"| {f.entity} | {show_value(f.value, attr.numeric, rng)} |" for f in facts]
        header = f"| {attr.kind.capitalize()} | {attr.label} |"
        text = "\n".join([f"## {title}", "", header, "|---|---|", *rows])
    else:
        rows = [f"- {f.entity}: {show_value(f.value, attr.numeric, rng)}" for f in facts]
        text = "\n".join([f"{title}:", *rows])
    return Document(text, tuple(facts))


# ---------------------------------------------------------------------------------------------
# The world.


class World:
    """Entities, the facts about them, and the texts written from those facts."""

    def __init__(self, config: WorldConfig, entities: list[Entity], facts: list[Fact]):
        self.config = config
        self.facts = facts
        self._entities = entities
        self._facts = {(f.entity, f.attribute): f for f in facts}

    @classmethod
    def generate(cls, config: WorldConfig | None = None) -> World:
        """Invent a world; the same config always gives the same world."""
        config = config or WorldConfig()
        config.validate()
        rng = random.Random(config.seed)
        words = iter(make_names(rng, config.words_needed, RESERVED_WORDS))

        def tiers(n: int) -> list[str]:
            n_head = min(n, round(config.head_fraction * n))
            n_tail = min(n - n_head, round(config.tail_fraction * n))
            labels = ["head"] * n_head + ["tail"] * n_tail + ["unseen"] * (n - n_head - n_tail)
            rng.shuffle(labels)
            return labels

        regions = [next(words) for _ in range(config.n_regions)]
        rivers = [next(words) for _ in range(config.n_rivers)]
        countries = [Entity(next(words), "country", t) for t in tiers(config.n_countries)]
        cities = [Entity(next(words), "city", t) for t in tiers(config.n_cities)]
        people = [Entity(f"{next(words)} {next(words)}", "person", t) for t in tiers(config.n_people)]
        companies = [Entity(f"{next(words)} {rng.choice(COMPANY_SUFFIXES)}", "company", t)
                     for t in tiers(config.n_companies)]
        values: dict[Entity, dict[str, int | str | Entity]] = {
            e: {} for e in countries + cities + people + companies}

        # Every country gets its own capital first (same tier, so both facts stay visible)...
        free = list(cities)
        for country in countries:
            capital = _pick(rng, free, country.tier, same_tier=True)
            free.remove(capital)
            values[country]["capital"] = capital
            values[capital]["country"] = country
        # ...then the other cities settle in countries.
        for city in free:
            values[city]["country"] = _pick(rng, countries, city.tier)

        unused_mayors = list(people)
        for city in cities:
            values[city]["population"] = rng.randint(20, 3000) * 1000
            values[city]["founded"] = rng.randint(600, 1950)
            values[city]["river"] = rng.choice(rivers)
            mayor = _pick(rng, unused_mayors or people, city.tier)
            if mayor in unused_mayors:
                unused_mayors.remove(mayor)
            values[city]["mayor"] = mayor
        for country in countries:
            own = sum(values[c]["population"] for c in cities if values[c]["country"] is country)
            values[country]["region"] = rng.choice(regions)
            values[country]["currency"] = next(words).lower()
            values[country]["population"] = own + rng.randint(100, 5000) * 1000  # plus the countryside
        for person in people:
            values[person]["birth_year"] = rng.randint(1920, 2000)
            values[person]["birth_city"] = _pick(rng, cities, person.tier)
            values[person]["occupation"] = rng.choice(OCCUPATIONS)
        for company in companies:
            founder = _pick(rng, people, company.tier)
            values[company]["founder"] = founder
            # Founded between the founder's 20th and 55th birthday, and not in the future.
            values[company]["founded"] = min(2024, values[founder]["birth_year"] + rng.randint(20, 55))
            values[company]["headquarters"] = _pick(rng, cities, company.tier)
            values[company]["product"] = rng.choice(PRODUCTS)

        facts = []
        for entity, attrs in values.items():
            for attribute in (a for a in ATTRIBUTES if a.kind == entity.kind):
                value = attrs[attribute.name]
                if isinstance(value, Entity):
                    facts.append(Fact(entity.name, entity.kind, attribute.name, value.name,
                                      rarest(entity.tier, value.tier)))
                else:
                    facts.append(Fact(entity.name, entity.kind, attribute.name, str(value), entity.tier))
        return cls(config, countries + cities + people + companies, facts)

    # -- looking things up --------------------------------------------------------------------

    def entities(self, kind: str | None = None, tier: str | None = None) -> list[Entity]:
        return [e for e in self._entities
                if (kind is None or e.kind == kind) and (tier is None or e.tier == tier)]

    def fact_table(self) -> dict[tuple[str, str], str]:
        return {key: f.value for key, f in self._facts.items()}

    def words(self) -> set[str]:
        """Every word of the entities' names and the facts' values, lowercased: what a drill of invented
        words leaves out, so that an unseen entity stays unseen."""
        names = [e.name for e in self.entities()] + list(self.fact_table().values())
        return {w.lower() for name in names for w in re.findall(r"[^\W\d_]+", name)}

    def fact(self, entity: str, attribute: str) -> Fact:
        try:
            return self._facts[(entity, attribute)]
        except KeyError:
            raise KeyError(f"no fact {attribute!r} about {entity!r}") from None

    def lookup(self, entity: str, attribute: str) -> str:
        return self.fact(entity, attribute).value

    # -- pretraining text ---------------------------------------------------------------------

    def pretraining_documents(self) -> list[str | list[dict]]:
        """Texts, and conversations (lists of messages) for the chat logs."""
        return [list(d.messages) if d.messages else d.text for d in self._documents]

    def documents(self) -> list[Document]:
        """The pretraining documents together with the facts each one states."""
        return list(self._documents)

    @cached_property
    def _documents(self) -> list[Document]:
        """We write in rounds: in round r every fact with more than r mentions left is stated once,
        either in a document about its entity (article, infobox, Q&A, news) or in a document about
        its attribute across entities (table, list). A fact thus appears in exactly its budget of
        distinct documents, in varied formats and phrasings.
        """
        rng = random.Random(f"{self.config.seed}:documents")
        budget = {}
        for fact in self.facts:
            if fact.tier == "head":
                budget[fact] = self.config.head_mentions
            elif fact.tier == "tail":
                budget[fact] = rng.randint(1, self.config.tail_mentions)
        docs = []
        for round_ in range(self.config.head_mentions):
            by_entity: dict[str, list[Fact]] = {}
            by_attribute: dict[tuple[str, str], list[Fact]] = {}
            for fact in (f for f, n in budget.items() if n > round_):
                if rng.random() < 0.7:
                    by_entity.setdefault(fact.entity, []).append(fact)
                else:
                    by_attribute.setdefault((fact.kind, fact.attribute), []).append(fact)
            for facts in by_entity.values():
                docs.append(_entity_document(facts, rng))
            for facts in by_attribute.values():
                rng.shuffle(facts)
                while facts:
                    size = rng.randint(3, 8)
                    docs.append(_attribute_document(facts[:size], rng))
                    facts = facts[size:]
        rng.shuffle(docs)
        return docs

    # -- retrieval ----------------------------------------------------------------------------

    @cached_property
    def _articles(self) -> list[dict]:
        """One article per entity: every fact about it, and every fact that names it."""
        articles = []
        for entity in self._entities:
            about = [f for f in self.facts if entity.name in (f.entity, f.value)]
            sentences = [statement(f) for f in about]
            text = " ".join([INTROS[entity.kind][0].format(e=entity.name), *sentences])
            slug = entity.name.lower().replace(" ", "-")
            articles.append({"id": f"{entity.kind}/{slug}", "title": entity.name, "text": text})
        return articles

    def retrieval_corpus(self) -> list[dict]:
        """Articles `{"id", "title", "text"}` for every entity, unseen ones included."""
        return [dict(a) for a in self._articles]

    @cached_property
    def _passages(self) -> list[dict]:
        """Every article cut into windows of three whole sentences, each starting two sentences after
        the last: what retrieval indexes (rag/world.py) and what SFT's retrieval renderings show, so that
        the model reads at test time passages like those it learned from."""
        passages = []
        for article in self._articles:
            sentences = [x if x.endswith(".") else x + "." for x in article["text"].split(". ")]
            for start in range(0, max(1, len(sentences) - 1), 2):
                passages.append({"id": f"{article['id']}@{start}", "article": article["id"],
                                 "title": article["title"], "text": " ".join(sentences[start:start + 3])})
        return passages

    def passages(self, title: str | None = None) -> list[dict]:
        """Passages `{"id", "article", "title", "text"}` (see _passages), all or one entity's."""
        return [dict(p) for p in self._passages if title is None or p["title"] == title]

    def search(self, query: str, k: int = 1) -> list[dict]:
        """The k best articles for a query by word overlap; a word in the title counts triple.

        Deliberately simple (the rag/ package does embeddings) and deterministic.
        """
        words = set(re.findall(r"\w+", query.lower()))
        scored = []
        for article in self._articles:
            title = set(re.findall(r"\w+", article["title"].lower()))
            text = set(re.findall(r"\w+", article["text"].lower()))
            scored.append((sum(3 * (w in title) + (w in text) for w in words), article))
        ranked = sorted(scored, key=lambda pair: pair[0], reverse=True)  # stable: ties keep corpus order
        return [dict(article) for score, article in ranked[:k] if score > 0]


def statement(fact: Fact) -> str:
    """A fact in its canonical sentence, as the encyclopedia states it: "The capital of Velmo is Dorin."."""
    return ATTRIBUTE[(fact.kind, fact.attribute)].statements[0].format(e=fact.entity, v=fact.value)


def generate_world(config: WorldConfig | None = None) -> World:
    """Same as `World.generate`: invent the world a config describes."""
    return World.generate(config)


# ----------------------------------------------------------------------------- the world of a run

WORLD_FILE = "world.json"  # in the run directory: the one world every stage of the run uses


def read_run_world(run: Path) -> WorldConfig | None:
    """The world a run recorded (looked up in RUN and, for a model directory like RUN/sft, its run)."""
    run = Path(run)
    for directory in (run, run.parent) if (run / "config.json").exists() else (run,):
        path = directory / WORLD_FILE
        if path.exists():
            try:
                return WorldConfig(**json.loads(path.read_text()))
            except (ValueError, TypeError) as e:
                raise PocketError(f"{path}: not a world configuration ({e})") from None
    return None


def record_run_world(run: Path, config: WorldConfig) -> None:
    """Write the run's world once; a run has one world, so a later stage asking for another is refused."""
    from ..common import atomic_write_json

    recorded = read_run_world(run) if (Path(run) / WORLD_FILE).exists() else None
    if recorded is None:
        config.validate()
        atomic_write_json(Path(run) / WORLD_FILE, asdict(config))
    elif recorded != config:
        raise PocketError(f"{Path(run) / WORLD_FILE} records the world {asdict(recorded)}; this run cannot "
                          f"switch to {asdict(config)} (start a new run directory for another world)")
