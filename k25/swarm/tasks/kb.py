"""A generated world behind the offline search tools: cities, people, companies in sectors, ledgers.

Everything is drawn from one seed, so the same seed gives the same documents, ids and answers. Sectors are
dealt to splits (train / heldout), and every company belongs to one sector and every ledger to one split, so
held-out tasks never ask about an entity a training task asked about. The documents state facts in varied
sentences; the answers are the generating facts.
"""

from __future__ import annotations

import dataclasses
import random

from k25.tools.search import Document

SPLITS = ("train", "heldout")

SECTORS = ("aerospace", "biotechnology", "shipping", "textiles", "robotics", "fisheries", "semiconductors",
           "publishing", "tea trading", "ceramics", "wind energy", "insurance", "logistics", "timber",
           "glassware", "optics", "mining", "brewing", "cartography", "clockmaking", "dairy", "railways",
           "perfumery", "pharmaceuticals")
COUNTRIES = ("Aldoria", "Brevant", "Caskia", "Dunmere", "Estoval", "Fennic Isles", "Gorvath", "Halvane")
DEPARTMENTS = ("Harbour Works", "Archives", "Roads", "Lighthouses", "Water Supply", "Public Gardens",
               "Fire Watch", "Schools")
PURPOSES = ("repairs", "new equipment", "wages", "surveys", "maintenance", "supplies", "inspections", "training")
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
           "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "x", "nd", "rk")
_COMPANY_SUFFIX = ("Works", "Holdings", "Group", "Industries", "Company", "Partners", "Collective", "Labs")


@dataclasses.dataclass(frozen=True)
class City:
    name: str
    country: str
    population: int
    founded: int


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    born: int
    birthplace: str


@dataclasses.dataclass(frozen=True)
class Company:
    name: str
    sector: str
    founded: int
    headquarters: str  # a city name
    employees: int
    ceo: str  # a person name


@dataclasses.dataclass(frozen=True)
class Ledger:
    doc_id: str
    org: str
    split: str
    entries: tuple[tuple[int, str, int, str], ...]  # (entry number, department, amount, purpose)


@dataclasses.dataclass
class World:
    seed: int
    cities: dict[str, City]
    people: dict[str, Person]
    companies: dict[str, Company]
    sectors: dict[str, tuple[str, ...]]  # sector -> company names
    sector_split: dict[str, str]
    ledgers: list[Ledger]
    docs: list[Document]
    doc_of: dict[str, str]  # entity name -> doc id


class _Names:
    """Unique pseudo-words from syllables."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            w = (w + self.rng.choice(_CODAS)).capitalize()
            if w not in self.used:
                self.used.add(w)
                return w


def _city_doc(c: City) -> str:
    return (f"{c.name} is a city in {c.country}. It was founded in {c.founded}.\n"
            f"Population: {c.population} inhabitants at the last census.\n")


def _person_doc(p: Person, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{p.name} was born in {p.born} in {p.birthplace}. {p.name} is known as a business executive.\n"
    return f"{p.name} (born {p.born}, {p.birthplace}) is a business executive.\n"


def _company_doc(c: Company, rng: random.Random) -> str:
    facts = [
        rng.choice((f"{c.name} is a company in the {c.sector} sector.",
                    f"{c.name} operates in the {c.sector} sector.")),
        rng.choice((f"It was founded in {c.founded}.", f"The company was established in {c.founded}.")),
        rng.choice((f"Its headquarters are in {c.headquarters}.", f"It is headquartered in {c.headquarters}.")),
        rng.choice((f"It employs {c.employees} people.", f"The workforce numbers {c.employees} employees.")),
        rng.choice((f"Its chief executive is {c.ceo}.", f"{c.ceo} serves as chief executive.")),
    ]
    head, rest = facts[0], facts[1:]
    rng.shuffle(rest)
    return " ".join([head, *rest]) + "\n"


def _ledger_doc(led: Ledger) -> str:
    lines = [f"Ledger of the {led.org}. Each line is one payment.\n"]
    lines += [f"Entry {n:04d}: {dept} paid {amount} crowns for {purpose}.\n" for n, dept, amount, purpose in
              led.entries]
    return "".join(lines)


def build_world(seed: int = 0, *, companies_per_sector: tuple[int, int] = (8, 24), n_cities: int = 60,
                ledgers_per_split: int = 8, ledger_entries: tuple[int, int] = (80, 160)) -> World:
    """The whole world of one seed (all splits). Sectors alternate train / heldout in a seeded order."""
    rng = random.Random(seed)
    names = _Names(rng)
    cities = {}
    for _ in range(n_cities):
        c = City(names.word(), rng.choice(COUNTRIES), rng.randint(5_000, 3_000_000), rng.randint(800, 1900))
        cities[c.name] = c
    city_names = list(cities)
    sector_order = list(SECTORS)
    rng.shuffle(sector_order)
    sector_split = {s: SPLITS[i % 2] for i, s in enumerate(sector_order)}
    people, companies, sectors = {}, {}, {}
    for sector in SECTORS:
        members = []
        for _ in range(rng.randint(*companies_per_sector)):
            ceo = Person(f"{names.word((1, 2))} {names.word()}", rng.randint(1940, 1990), rng.choice(city_names))
            people[ceo.name] = ceo
            c = Company(f"{names.word()} {rng.choice(_COMPANY_SUFFIX)}", sector, rng.randint(1850, 2020),
                        rng.choice(city_names), rng.randint(20, 90_000), ceo.name)
            companies[c.name] = c
            members.append(c.name)
        sectors[sector] = tuple(members)
    ledgers = []
    for split in SPLITS:
        for i in range(ledgers_per_split):
            entries = tuple((n + 1, rng.choice(DEPARTMENTS), rng.randint(10, 9_999), rng.choice(PURPOSES))
                            for n in range(rng.randint(*ledger_entries)))
            ledgers.append(Ledger(f"ledger-{split}-{i:02d}", f"{names.word()} Borough Council", split, entries))
    docs, doc_of = [], {}
    ids = rng.sample(range(100_000, 999_999), len(cities) + len(people) + len(companies))
    for entity, text in ([(c, _city_doc(c)) for c in cities.values()] +
                         [(p, _person_doc(p, rng)) for p in people.values()] +
                         [(c, _company_doc(c, rng)) for c in companies.values()]):
        doc_id = f"doc-{ids.pop()}"
        docs.append(Document(doc_id, entity.name, text))
        doc_of[entity.name] = doc_id
    for sector, members in sectors.items():
        doc_id = f"registry-{sector.replace(' ', '-')}"
        text = (f"The corporate registry lists {len(members)} companies in the {sector} sector:\n" +
                "".join(f"- {m}\n" for m in members))
        docs.append(Document(doc_id, f"Corporate registry: {sector} companies", text))
    docs += [Document(led.doc_id, f"Ledger of the {led.org}", _ledger_doc(led)) for led in ledgers]
    rng.shuffle(docs)
    return World(seed, cities, people, companies, sectors, sector_split, ledgers, docs, doc_of)
