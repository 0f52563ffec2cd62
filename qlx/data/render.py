"""Render a :class:`~qlx.data.world.World` into documents of varied styles, recording every fact's span exactly.

Styles: biographies, organisation profiles, news items (appointments, acquisitions, product launches, incidents and
their consequences), gazetteer entries, annual reports with a markdown segment table, and board-meeting transcripts.
A fact's sentence is its span; the fact's object appears verbatim in it. ``brief=True`` drops the filler sentences
(short documents for small demo contexts). Each document's wording depends only on (world seed, document id).
"""

import random
import re
from collections.abc import Iterator

from qlx.data.documents import Document, Fact, TextBuilder
from qlx.data.world import MEASURES, ROLES, World

_FILLER = {
    "org": (
        "{name} rarely comments on market rumours.",
        "Analysts describe the management style at {name} as cautious.",
        "Employees often mention the long-standing emphasis on internal training.",
        "The organisation publishes a short sustainability statement every spring.",
        "{name} keeps a modest presence at industry fairs.",
        "Several former staff members have gone on to start their own ventures.",
        "Its offices are known for an unusually large staff library.",
        "Critics have questioned the pace of its digital transformation.",
    ),
    "person": (
        "Colleagues describe {name} as meticulous and patient.",
        "{name} is a keen amateur astronomer.",
        "In interviews, {name} often stresses the value of apprenticeships.",
        "{name} has served on several advisory panels.",
        "Friends say {name} spends most weekends hiking.",
        "{name} rarely gives public speeches.",
    ),
    "news": (
        "Further details are expected in the coming weeks.",
        "A spokesperson declined to give additional figures.",
        "Local commentators reacted with measured optimism.",
        "The announcement was published on the company website.",
        "Trade unions said they would study the decision closely.",
        "Industry observers had anticipated the move for some time.",
    ),
    "place": (
        "The old market square remains a popular meeting point.",
        "Winters there are long and mostly dry.",
        "A ferry service connects the harbour with nearby islands.",
        "The municipal library holds a notable map collection.",
        "Tourism has grown steadily over the last decade.",
    ),
}
_MEETING_LINES = (
    "Let us start with the quarterly priorities.",
    "I suggest we postpone the discussion of the new office layout.",
    "The hiring plan is on track.",
    "We should revisit the supplier contracts before the summer.",
    "I agree, but we need more data first.",
    "Customer feedback has been broadly positive.",
    "Let us close the meeting here and continue next month.",
)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Doc:
    """One document being written: a :class:`TextBuilder` plus the per-document rng and filler choice."""

    def __init__(self, world: World, doc_id: str, title: str, kind: str, mentions: list[str], brief: bool):
        self.rng = random.Random(f"{world.seed}:{doc_id}")
        self.builder = TextBuilder(doc_id)
        self.doc_id, self.title, self.kind, self.mentions, self.brief = doc_id, title, kind, mentions, brief
        self.tables = []
        self._unused: dict[str, list[str]] = {}
        self.builder.add(f"{title}\n\n")

    def say(self, sentence: str, *facts) -> None:
        self.builder.add(sentence + " ", facts)

    def fill(self, bank: str, name: str, k: int) -> None:
        """Append ``k`` filler sentences (no facts), never repeating one within the document."""
        if self.brief:
            return
        if bank not in self._unused:
            self._unused[bank] = self.rng.sample(_FILLER[bank], len(_FILLER[bank]))
        for _ in range(min(k, len(self._unused[bank]))):
            self.builder.add(self._unused[bank].pop().format(name=name) + " ")

    def choose(self, *options: str) -> str:
        return self.rng.choice(options)

    def done(self) -> Document:
        text = self.builder.text().rstrip()
        return Document(self.doc_id, self.title, text, self.kind, self.builder.facts, self.tables, self.mentions)


def _biography(world: World, p, founded: list, brief: bool) -> Document:
    a = p.attrs
    d = _Doc(world, f"bio:{slug(p.name)}", p.name, "biography", [p.name], brief)
    born = ("born_in", a["born_in"]), ("birth_year", a["birth_year"])
    template = d.choose(
        "{p} was born in {city} in {year}.", "Born in {year} in {city}, {p} grew up in modest circumstances."
    )
    d.say(template.format(p=p.name, city=a["born_in"], year=a["birth_year"]), *((p.name, *f) for f in born))
    d.fill("person", p.name, 1)
    if "studied_at" in a:
        template = d.choose("{p} studied at {u}.", "After school, {p} enrolled at {u}.")
        d.say(template.format(p=p.name, u=a["studied_at"]), (p.name, "studied_at", a["studied_at"]))
    for org in founded:
        year = org.attrs["founded_year"]
        d.say(
            f"In {year}, {p.name} founded {org.name}.",
            (org.name, "founded_by", p.name),
            (org.name, "founded_year", year),
        )
    if "works_for" in a:
        role = p.info["role"]
        template = d.choose("{p} works for {o} as {role}.", "Today {p} serves {o} as {role}.")
        d.say(template.format(p=p.name, o=a["works_for"], role=role), (p.name, "works_for", a["works_for"]))
    d.fill("person", p.name, 2)
    return d.done()


def _profile(world: World, org, brief: bool) -> Document:
    a = org.attrs
    d = _Doc(world, f"profile:{slug(org.name)}", f"About {org.name}", "profile", [org.name], brief)
    if org.info["type"] == "university":
        d.say(
            f"{org.name} is a university based in {a['headquartered_in']}, founded in {a['founded_year']}.",
            (org.name, "headquartered_in", a["headquartered_in"]),
            (org.name, "founded_year", a["founded_year"]),
        )
        d.fill("org", org.name, 2)
        d.say(f"Its president is {a['led_by']}.", (org.name, "led_by", a["led_by"]))
        return d.done()
    article = "an" if a["sector"][0] in "aeiou" else "a"
    d.say(
        f"{org.name} is {article} {a['sector']} company headquartered in {a['headquartered_in']}.",
        (org.name, "sector", a["sector"]),
        (org.name, "headquartered_in", a["headquartered_in"]),
    )
    d.fill("org", org.name, 1)
    d.say(
        f"It was founded in {a['founded_year']} by {a['founded_by']}.",
        (org.name, "founded_year", a["founded_year"]),
        (org.name, "founded_by", a["founded_by"]),
    )
    segments = org.info["segments"]
    d.say(f"The company reports its results in {len(segments)} segments: {', '.join(segments)}.")
    d.fill("org", org.name, 2)
    return d.done()


def _appointment(world: World, org, brief: bool) -> Document:
    ceo, since = org.attrs["led_by"], org.info["ceo_since"]
    role = world.entities[ceo].info["role"]
    d = _Doc(world, f"news:appointment:{slug(org.name)}", f"{ceo} to lead {org.name}", "news", [org.name, ceo], brief)
    d.say(
        f"{org.name} has named {ceo} as its {role}, effective {since}.",
        (org.name, "led_by", ceo),
        (ceo, "works_for", org.name),
    )
    d.fill("news", org.name, 2)
    return d.done()


def _acquisition(world: World, org, brief: bool) -> Document:
    buyer, year = org.attrs["acquired_by"], org.info["acquired_year"]
    d = _Doc(world, f"news:acquisition:{slug(org.name)}", f"{buyer} buys {org.name}", "news", [org.name, buyer], brief)
    d.say(f"{buyer} has completed its acquisition of {org.name} in {year}.", (org.name, "acquired_by", buyer))
    d.fill("news", buyer, 2)
    return d.done()


def _launch(world: World, product, brief: bool) -> Document:
    a = product.attrs
    d = _Doc(
        world,
        f"news:launch:{slug(product.name)}",
        f"{a['made_by']} unveils the {product.name}",
        "news",
        [
            product.name,
            a["made_by"],
        ],
        brief,
    )
    d.say(
        f"{a['made_by']} launched the {product.name} in {a['launch_year']}.",
        (product.name, "made_by", a["made_by"]),
        (product.name, "launch_year", a["launch_year"]),
    )
    d.say(f"The {product.name} sells for {a['price']} credits.", (product.name, "price", a["price"]))
    d.fill("news", a["made_by"], 2)
    return d.done()


def _gazetteer_city(world: World, city, brief: bool) -> Document:
    a = city.attrs
    d = _Doc(world, f"place:{slug(city.name)}", city.name, "gazetteer", [city.name], brief)
    d.say(
        f"{city.name} is a city in {a['located_in']} with a population of {a['population']}.",
        (city.name, "located_in", a["located_in"]),
        (city.name, "population", a["population"]),
    )
    d.fill("place", city.name, 2)
    return d.done()


def _gazetteer_country(world: World, country, brief: bool) -> Document:
    capital = country.attrs["capital"]
    d = _Doc(world, f"place:{slug(country.name)}", country.name, "gazetteer", [country.name], brief)
    d.say(f"The capital of {country.name} is {capital}.", (country.name, "capital", capital))
    d.fill("place", country.name, 2)
    return d.done()


def _incident(world: World, event, brief: bool) -> Document:
    a, info = event.attrs, event.info
    d = _Doc(world, f"news:event:{slug(event.name)}", _cap(event.name), "news", [event.name, a["involved"]], brief)
    if "caused_by" not in a:
        d.say(
            f"In {info['month']} {a['event_year']}, a {info['kind']} hit {a['took_place_in']}, "
            f"disrupting operations at {a['involved']}.",
            (event.name, "event_year", a["event_year"]),
            (event.name, "took_place_in", a["took_place_in"]),
            (event.name, "involved", a["involved"]),
        )
    else:
        d.say(
            f"{a['involved']} announced {event.name} at its headquarters in {a['took_place_in']} "
            f"in {info['month']} {a['event_year']}.",
            (event.name, "involved", a["involved"]),
            (event.name, "took_place_in", a["took_place_in"]),
            (event.name, "event_year", a["event_year"]),
        )
        d.say(
            f"The company said it was a direct consequence of {a['caused_by']}.",
            (event.name, "caused_by", a["caused_by"]),
        )
    d.fill("news", a["involved"], 2)
    return d.done()


def _report(world: World, org, year: int, rows, brief: bool) -> Document:
    ceo = org.attrs["led_by"]
    d = _Doc(world, f"report:{slug(org.name)}:{year}", f"{org.name} Annual Report {year}", "report", [org.name], brief)
    d.say(
        d.choose(
            "In the letter opening this report, {ceo}, {role} of {o}, thanks employees for a demanding year.",
            "{ceo}, {role} of {o}, signs the foreword of this report.",
        ).format(ceo=ceo, role=world.entities[ceo].info["role"], o=org.name),
        (org.name, "led_by", ceo),
    )
    d.fill("org", org.name, 2)
    d.builder.add(f"\n\nSegment results for fiscal year {year}, in thousands of credits:\n\n")
    header = ["Segment", "Revenue", "Operating expenses"]
    cells = [[r.segment, str(r.revenue), str(r.operating_expenses)] for r in rows]
    table = d.builder.add_table(header, cells, {"org": org.name, "year": year}, "thousands of credits")
    d.tables.append(table)
    for r, spans in zip(rows, table.cell_spans, strict=True):
        for measure, (start, end) in zip(MEASURES, spans[1:], strict=True):
            qualifiers = {"year": year, "segment": r.segment}
            obj = str(getattr(r, measure))
            d.builder.facts.append(
                Fact(org.name, measure, obj, d.doc_id, start, end, tuple(sorted(qualifiers.items())))
            )
    d.builder.add("\n")
    d.fill("org", org.name, 1)
    return d.done()


def _transcript(world: World, org, year: int, staff: list, products_of: dict, brief: bool) -> Document:
    ceo = org.attrs["led_by"]
    month = random.Random(f"{world.seed}:{org.name}:{year}").choice(("March", "June", "September", "November"))
    doc_id = f"transcript:{slug(org.name)}:{year}"
    d = _Doc(world, doc_id, f"Minutes of the {org.name} board meeting, {month} {year}", "transcript", [org.name], brief)
    attendees = [world.entities[ceo]] + staff
    d.builder.add("Present: ")
    for i, person in enumerate(attendees):
        sep = ", " if i < len(attendees) - 1 else ".\n\n"
        d.builder.add(f"{person.name} ({person.info['role']}, {org.name})", [(person.name, "works_for", org.name)])
        d.builder.add(sep)
    products = products_of.get(org.name, [])
    lines = list(d.rng.sample(_MEETING_LINES, 3 if brief else 6))
    for i, line in enumerate(lines):
        speaker = attendees[i % len(attendees)].name
        d.builder.add(f"{speaker}: {line}\n")
        if i == 1 and products:
            p = products[0]
            d.builder.add(
                f"{speaker}: Demand for the {p.name} has been steady since its launch in {p.attrs['launch_year']}.\n",
                [(p.name, "launch_year", p.attrs["launch_year"])],
            )
    return d.done()


def render_world(world: World, *, brief: bool = False) -> Iterator[Document]:
    """All documents of the world, in a deterministic order."""
    founded_by: dict[str, list] = {}
    for org in world.of_kind("org"):
        if "founded_by" in org.attrs:
            founded_by.setdefault(org.attrs["founded_by"], []).append(org)
    for e in world.entities.values():
        if e.kind == "person":
            yield _biography(world, e, founded_by.get(e.name, []), brief)
        elif e.kind == "org":
            yield _profile(world, e, brief)
            yield _appointment(world, e, brief)
            if "acquired_by" in e.attrs:
                yield _acquisition(world, e, brief)
        elif e.kind == "product":
            yield _launch(world, e, brief)
        elif e.kind == "city":
            yield _gazetteer_city(world, e, brief)
        elif e.kind == "country":
            yield _gazetteer_country(world, e, brief)
        elif e.kind == "event":
            yield _incident(world, e, brief)
    by_org_year: dict[tuple[str, int], list] = {}
    for row in world.financials:
        by_org_year.setdefault((row.org, row.year), []).append(row)
    for (org, year), rows in by_org_year.items():
        yield _report(world, world.entities[org], year, rows, brief)
    products_of: dict[str, list] = {}
    for p in world.of_kind("product"):
        products_of.setdefault(p.attrs["made_by"], []).append(p)
    staff_of: dict[str, list] = {}
    for p in world.of_kind("person"):
        if "works_for" in p.attrs and p.info.get("role") in ROLES:
            staff_of.setdefault(p.attrs["works_for"], []).append(p)
    for org in world.of_kind("org"):
        if org.info["type"] == "company" and staff_of.get(org.name):
            year = random.Random(f"{world.seed}:meeting:{org.name}").randint(2016, 2023)
            yield _transcript(world, org, year, staff_of[org.name][:3], products_of, brief)
