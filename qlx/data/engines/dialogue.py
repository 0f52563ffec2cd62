"""Dialogue memory tasks: a long user/assistant conversation, then a needle question (NIAH) or an MRCR request.

The haystack is a pool of generated exchanges (requests for poems, stories, slogans, advice). MRCR (after OpenAI's
multi-round co-reference task): several responses of the same kind about a topic that no haystack exchange uses are
placed in order; the question asks to prepend a random string to the n-th of them and reproduce it. NIAH: a user states
an access code for a place's archive among similar statements about other places; the question asks for it.
"""

import itertools
import random
import string
from collections.abc import Iterator

from qlx.data.assemble import InlinePiece
from qlx.data.documents import Fact
from qlx.data.engines.base import Candidate

KINDS = ("poem", "limerick", "short story", "slogan", "haiku")
POOL_TOPICS = tuple(
    [
        "rivers",
        "lanterns",
        "bicycles",
        "owls",
        "glaciers",
        "bakeries",
        "harbours",
        "violins",
        "comets",
        "orchards",
        "deserts",
        "trains",
        "libraries",
        "foxes",
        "markets",
        "storms",
        "bridges",
        "gardens",
        "mountains",
        "kettles",
        "clocks",
        "ferries",
        "meadows",
        "beetles",
        "castles",
        "islands",
        "rain",
        "umbrellas",
        "chess",
        "spices",
        "fountains",
        "kites",
        "wolves",
        "tides",
        "festivals",
        "mirrors",
        "candles",
        "bees",
        "quarries",
        "frost",
        "tunnels",
    ]
)
NEEDLE_TOPICS = tuple(
    [
        "tapirs",
        "lighthouses",
        "narwhals",
        "typewriters",
        "sundials",
        "accordions",
        "pangolins",
        "zeppelins",
        "axolotls",
        "compasses",
        "quokkas",
        "telescopes",
        "gondolas",
        "marmots",
        "hourglasses",
    ]
)
_ADJ = [
    "quiet",
    "golden",
    "restless",
    "ancient",
    "silver",
    "gentle",
    "hollow",
    "bright",
    "distant",
    "patient",
    "stubborn",
    "tender",
    "wild",
]
_VERBS = [
    "drifts",
    "waits",
    "sings",
    "turns",
    "glows",
    "wanders",
    "rests",
    "hums",
    "shivers",
    "remembers",
    "leans",
    "listens",
]
_PREPS = ["beneath", "beside", "beyond", "within", "across", "above"]
_NOUNS = [
    "morning",
    "shadow",
    "river",
    "window",
    "harbour",
    "orchard",
    "evening",
    "meadow",
    "valley",
    "lantern",
    "doorway",
]
_ADVICE_TOPICS = ("sleep better", "learn a language", "keep houseplants alive", "plan a trip", "save money")
_ADVICE = (
    "Start small and keep a steady routine.",
    "Write down what works and what does not.",
    "Ask someone experienced for feedback early.",
    "Set a fixed time each day for it.",
    "Do not try to change everything at once.",
    "Review your progress every week.",
)
ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _line(rng: random.Random, topic: str) -> str:
    adj, verb, prep, noun = rng.choice(_ADJ), rng.choice(_VERBS), rng.choice(_PREPS), rng.choice(_NOUNS)
    return f"The {adj} {topic} {verb} {prep} the {rng.choice(_ADJ)} {noun}"


def response(rng: random.Random, kind: str, topic: str) -> str:
    """A generated assistant response of ``kind`` about ``topic``."""
    if kind == "slogan":
        return f"{_line(rng, topic)}: {rng.choice(_ADJ)} {topic}, {rng.choice(_ADJ)} days!"
    if kind == "short story":
        return " ".join(_line(rng, topic) + "." for _ in range(rng.randint(3, 5)))
    n = {"haiku": 3, "limerick": 5}.get(kind, rng.randint(4, 6))
    return "\n".join(_line(rng, topic) for _ in range(n))


def _request(rng: random.Random, kind: str, topic: str) -> str:
    return rng.choice(
        ("Write a {k} about {t}.", "Could you write me a {k} about {t}?", "I'd love a {k} about {t}.")
    ).format(k=kind, t=topic)


def dialogue_pool(seed: int) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """Endless haystack exchanges ``(doc_id, text, tags)``; each depends only on (seed, its index)."""
    for i in itertools.count():
        rng = random.Random(f"qlx-dialogue-{seed}-{i}")
        if rng.random() < 0.2:
            topic = rng.choice(_ADVICE_TOPICS)
            text = f"User: How can I {topic}?\nAssistant: " + " ".join(rng.sample(_ADVICE, 3))
            yield f"dlg:{i:07d}", text, (f"advice|{topic}",)
        else:
            kind, topic = rng.choice(KINDS), rng.choice(POOL_TOPICS)
            text = f"User: {_request(rng, kind, topic)}\nAssistant: {response(rng, kind, topic)}"
            yield f"dlg:{i:07d}", text, (f"{kind}|{topic}",)


class DialogueEngine:
    """Proposes ``dialogue`` questions; ``places`` name the archives of NIAH needles, ``count_tokens`` sizes needles."""

    def __init__(self, places: list[str], count_tokens):
        if len(places) < 4:
            raise ValueError("the dialogue engine needs at least 4 place names")
        self.places, self.count_tokens = list(places), count_tokens

    def propose(self, rng: random.Random, task_type: str = "dialogue", *, cost=None, budget=None) -> Candidate | None:
        if task_type != "dialogue":
            raise ValueError(f"the dialogue engine makes 'dialogue' questions, not {task_type!r}")
        candidate = self._mrcr(rng) if rng.random() < 0.5 else self._niah(rng)
        if budget is not None and sum(self.count_tokens([p.text for p in candidate.evidence])) > budget:
            return None
        return candidate

    def _mrcr(self, rng: random.Random) -> Candidate:
        kind, topic, k = rng.choice(KINDS), rng.choice(NEEDLE_TOPICS), rng.randint(2, 4)
        pieces, facts, responses = [], [], []
        while len(responses) < k:
            text = response(rng, kind, topic)
            if text not in responses:
                responses.append(text)
        for j, text in enumerate(responses):
            head = f"User: {_request(rng, kind, topic)}\nAssistant: "
            pieces.append(InlinePiece(f"needle:{j}", head + text))
            subject = f"{kind} about {topic} #{j + 1}"
            facts.append(Fact(subject, "assistant_response", text, f"needle:{j}", len(head), len(head) + len(text)))
        index = rng.randrange(k)
        prefix = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))
        question = (
            f"Prepend {prefix} to the {ORDINALS[index]} {kind} about {topic} that the assistant wrote in the "
            f"conversation above, and reproduce that {kind} exactly, with nothing else."
        )
        program = {"op": "mrcr", "index": index, "prefix": prefix}
        return Candidate("dialogue", question, prefix + responses[index], "text", k, facts, program, pieces, "mrcr")

    def _niah(self, rng: random.Random) -> Candidate:
        places = rng.sample(self.places, rng.randint(2, 4))
        codes = rng.sample(range(100000, 1000000), len(places))
        pieces = []
        for j, (place, code) in enumerate(zip(places, codes, strict=True)):
            said = f"User: Please remember this for later: the access code for the {place} archive is {code}."
            pieces.append(InlinePiece(f"needle:{j}", f"{said}\nAssistant: Noted, I will keep that in mind."))
        fact = Fact(f"the {places[0]} archive", "access_code", str(codes[0]), "needle:0", 0, len(pieces[0].text))
        rng.shuffle(pieces)
        question = f"What is the access code for the {places[0]} archive mentioned in the conversation above?"
        program = {"op": "niah", "needle": 0}
        return Candidate("dialogue", question, str(codes[0]), "number", 1, [fact], program, pieces, "niah")
