"""A seeded fictional world: people, organisations, places, products, events, and yearly financial tables.

Everything is invented (names from syllables), so no question about it can be answered from a model's prior knowledge.
Entities carry *facts* as ``attrs`` (relation -> object, each relation functional: one object per subject) and
rendering-only details as ``info``. ``generate_world(seed, n_orgs)`` is deterministic in its arguments.
"""

import dataclasses
import random

from qlx.data.names import NameMaker

ENTITY_KINDS = ("person", "org", "city", "country", "product", "event")
RELATIONS: dict[str, tuple[str, str]] = {
    "born_in": ("person", "city"),
    "birth_year": ("person", "year"),
    "works_for": ("person", "org"),
    "studied_at": ("person", "org"),
    "headquartered_in": ("org", "city"),
    "founded_year": ("org", "year"),
    "founded_by": ("org", "person"),
    "led_by": ("org", "person"),
    "acquired_by": ("org", "org"),
    "sector": ("org", "text"),
    "made_by": ("product", "org"),
    "launch_year": ("product", "year"),
    "price": ("product", "number"),
    "located_in": ("city", "country"),
    "population": ("city", "number"),
    "capital": ("country", "city"),
    "took_place_in": ("event", "city"),
    "event_year": ("event", "year"),
    "involved": ("event", "org"),
    "caused_by": ("event", "event"),
}
"""relation -> (subject kind, object kind); object kinds are entity kinds or the literals year / number / text."""

SECTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "energy": ("Energy", ("Electric", "Gas", "Renewables", "Grid Services")),
    "logistics": ("Logistics", ("Freight", "Warehousing", "Courier", "Port Services")),
    "food": ("Foods", ("Dairy", "Bakery", "Beverages", "Frozen Goods")),
    "software": ("Systems", ("Cloud", "Licences", "Consulting", "Support")),
    "textiles": ("Textiles", ("Apparel", "Industrial Fabrics", "Home Goods")),
    "maritime": ("Maritime", ("Shipping", "Shipbuilding", "Ferries")),
    "pharmaceuticals": ("Pharmaceuticals", ("Generics", "Vaccines", "Diagnostics")),
    "mining": ("Minerals", ("Copper", "Lithium", "Nickel")),
}
ROLES = ("chief engineer", "head of research", "financial analyst", "operations manager", "product designer")
CAUSE_KINDS = ("flood", "fire", "strike", "power outage", "cyberattack", "supply shortage")
EFFECT_KINDS = ("recall", "price increase", "production halt")
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
FISCAL_YEARS = (2016, 2023)
MEASURES = ("revenue", "operating_expenses")


@dataclasses.dataclass
class Entity:
    name: str
    kind: str
    attrs: dict[str, str | int] = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FinancialRow:
    """One segment of one organisation in one fiscal year; money in thousands of credits."""

    org: str
    year: int
    segment: str
    revenue: int
    operating_expenses: int


@dataclasses.dataclass
class World:
    seed: int
    entities: dict[str, Entity]
    financials: list[FinancialRow]
    twins: dict[str, list[str]]
    """name -> near-duplicate names (both directions), used to pick confusable distractors."""

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind == kind]

    def value(self, subject: str, relation: str):
        return self.entities[subject].attrs.get(relation)


def _year_range(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, max(lo, hi))


def generate_world(seed: int, n_orgs: int = 40) -> World:
    """A world with about ``n_orgs`` organisations (1 in 8 a university) and everything around them."""
    if n_orgs < 4:
        raise ValueError(f"n_orgs must be >= 4, got {n_orgs}")
    rng = random.Random(f"qlx-world-{seed}")
    names = NameMaker(rng)
    entities: dict[str, Entity] = {}
    twins: dict[str, list[str]] = {}

    def add(entity: Entity) -> Entity:
        entities[entity.name] = entity
        return entity

    def twin_of(entity: Entity) -> Entity:
        twin = Entity(names.near_duplicate(entity.name), entity.kind, info=dict(entity.info))
        twins.setdefault(entity.name, []).append(twin.name)
        twins.setdefault(twin.name, []).append(entity.name)
        return add(twin)

    countries = [add(Entity(names.country(), "country")) for _ in range(max(3, n_orgs // 30))]
    cities = []
    for i in range(max(8, n_orgs // 3)):
        city = add(Entity(names.city(), "city"))
        city.attrs["located_in"] = countries[i % len(countries)].name
        city.attrs["population"] = rng.randint(20, 3000) * 1000 + rng.randint(0, 999)
        cities.append(city)
    for city in list(cities[: len(cities) // 10]):
        twin = twin_of(city)
        twin.attrs = {"located_in": rng.choice(countries).name, "population": rng.randint(20, 3000) * 1000 + 7}
        cities.append(twin)
    for country in countries:
        country.attrs["capital"] = next(c.name for c in cities if c.attrs["located_in"] == country.name)

    def person(born_lo: int, born_hi: int) -> Entity:
        p = add(Entity(names.person(), "person"))
        p.attrs["birth_year"] = _year_range(rng, born_lo, born_hi)
        p.attrs["born_in"] = rng.choice(cities).name
        return p

    n_universities = max(2, n_orgs // 8)
    universities = []
    for _ in range(n_universities):
        city = rng.choice(cities)
        uni = add(Entity(names.university(city.name), "org", info={"type": "university"}))
        uni.attrs.update(founded_year=rng.randint(1820, 1960), headquartered_in=city.name)
        uni.attrs["led_by"] = person(1950, 1975).name
        uni.info["ceo_since"] = rng.randint(2000, 2021)
        universities.append(uni)

    companies = []
    sector_names = list(SECTORS)
    for _ in range(n_orgs - n_universities):
        sector = rng.choice(sector_names)
        noun, segments = SECTORS[sector]
        org = add(Entity(names.organisation(noun), "org", info={"type": "company"}))
        founded = rng.randint(1900, 2012)
        founder = person(founded - 55, founded - 22)
        org.attrs.update(sector=sector, founded_year=founded, founded_by=founder.name)
        org.attrs["headquartered_in"] = rng.choice(cities).name
        org.attrs["led_by"] = person(1950, 1990).name
        org.info["segments"] = rng.sample(segments, rng.randint(2, min(3, len(segments))))
        org.info["ceo_since"] = rng.randint(max(founded, 2000), 2021)
        companies.append(org)
    for org in list(companies[: len(companies) // 5]):
        twin = twin_of(org)
        founded = rng.randint(1900, 2012)
        twin.attrs.update(sector=org.attrs["sector"], founded_year=founded)
        twin.attrs["founded_by"] = person(founded - 55, founded - 22).name
        twin.attrs["headquartered_in"] = rng.choice(cities).name
        twin.attrs["led_by"] = person(1950, 1990).name
        twin.info["segments"] = rng.sample(SECTORS[org.attrs["sector"]][1], len(org.info["segments"]))
        twin.info["ceo_since"] = rng.randint(max(founded, 2000), 2021)
        companies.append(twin)
    for i, org in enumerate(companies[1:], 1):
        if rng.random() < 0.15:
            buyer = rng.choice(companies[:i])
            if "acquired_by" not in buyer.attrs:
                org.attrs["acquired_by"] = buyer.name
                org.info["acquired_year"] = rng.randint(
                    max(org.attrs["founded_year"], buyer.attrs["founded_year"]), 2023
                )

    orgs = universities + companies
    for org in orgs:
        ceo = entities[org.attrs["led_by"]]
        ceo.attrs["works_for"] = org.name
        ceo.info["role"] = "chief executive" if org.info["type"] == "company" else "president"
    for founder_name in [c.attrs["founded_by"] for c in companies]:
        founder = entities[founder_name]
        if rng.random() < 0.7:
            founder.attrs["studied_at"] = rng.choice(universities).name
    for _ in range(n_orgs * 3 // 2):
        p = person(1955, 2000)
        p.attrs["works_for"] = rng.choice(companies).name
        p.info["role"] = rng.choice(ROLES)
        if rng.random() < 0.8:
            p.attrs["studied_at"] = rng.choice(universities).name
    people = [e for e in entities.values() if e.kind == "person"]
    for p in list(people[: len(people) // 10]):
        twin = twin_of(p)
        twin.attrs = {"birth_year": rng.randint(1940, 2000), "born_in": rng.choice(cities).name}
        if "works_for" in p.attrs:
            twin.attrs["works_for"] = rng.choice(companies).name
            twin.info["role"] = rng.choice(ROLES)

    products = []
    for org in companies:
        for _ in range(rng.randint(1, 2)):
            product = add(Entity(names.product(), "product"))
            product.attrs.update(made_by=org.name, launch_year=rng.randint(max(org.attrs["founded_year"], 1990), 2023))
            product.attrs["price"] = rng.randint(5, 5000)
            products.append(product)

    titles: set[str] = set()

    def event(title: str, **attrs) -> Entity | None:
        if title in titles:
            return None
        titles.add(title)
        return add(Entity(title, "event", attrs=attrs))

    for _ in range(max(2, len(companies) // 2)):
        org = rng.choice(companies)
        city = rng.choice(cities)
        year = rng.randint(max(org.attrs["founded_year"], 1995), 2022)
        kind = rng.choice(CAUSE_KINDS)
        month = rng.choice(MONTHS)
        cause = event(f"the {month} {year} {city.name} {kind}", took_place_in=city.name, event_year=year)
        if cause is None:
            continue
        cause.attrs["involved"] = org.name
        cause.info.update(kind=kind, month=month)
        effect_kind = rng.choice(EFFECT_KINDS)
        affected = [p for p in products if p.attrs["made_by"] == org.name]
        product = rng.choice(affected) if affected else None
        effect_year = year + rng.randint(0, 1)
        if effect_kind == "production halt" or product is None:
            effect_kind, title = "production halt", f"the {effect_year} production halt at {org.name}"
        elif effect_kind == "recall":
            title = f"the {effect_year} {product.name} recall"
        else:
            title = f"the {effect_year} {product.name} price increase"
        effect = event(title, took_place_in=org.attrs["headquartered_in"], event_year=effect_year)
        if effect is None:
            continue
        effect.attrs.update(involved=org.name, caused_by=cause.name)
        effect.info.update(kind=effect_kind, month=rng.choice(MONTHS), product=product.name if product else None)

    financials = []
    for org in companies:
        first = max(FISCAL_YEARS[0], org.attrs["founded_year"] + 1)
        for segment in org.info["segments"]:
            revenue = rng.randint(2_000, 900_000)
            for year in range(first, FISCAL_YEARS[1] + 1):
                ratio = rng.uniform(0.55, 0.97)
                financials.append(FinancialRow(org.name, year, segment, revenue, int(revenue * ratio)))
                revenue = max(500, int(revenue * rng.uniform(0.8, 1.3)))
    return World(seed=seed, entities=entities, financials=financials, twins=twins)
