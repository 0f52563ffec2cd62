"""Seeded generators of fictional names (people, places, organisations, products) that are unique within a world."""

import random

_ONSETS = [
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "j",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "qu",
    "r",
    "s",
    "sh",
    "st",
    "t",
    "tr",
    "v",
    "w",
    "z",
]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou"]
_CODAS = ["l", "n", "r", "s", "th", "x", "m", "nd", "rt", "lk", "ck", "sk", "v"]
_CITY_SUFFIXES = ("vik", "bury", "holm", "port", "stad", "mouth", "ford", "gard", "wick", "ton")
_COUNTRY_FORMS = ("{}ia", "{}and", "{}istan", "Republic of {}", "{}ora")
_PRODUCT_WORDS = (
    "Zentra",
    "Orvo",
    "Kelda",
    "Auron",
    "Vessa",
    "Quill",
    "Tarn",
    "Mirel",
    "Sorra",
    "Brisk",
    "Noct",
    "Pell",
)
_UNIVERSITY_FORMS = ("University of {}", "{} Institute of Technology", "{} Polytechnic", "{} College")


def _syllable(rng: random.Random, coda_p: float = 0.4) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if rng.random() < coda_p else "")


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(lo, hi))).capitalize()


class NameMaker:
    """Draws names that were never drawn before in this world (all kinds share one namespace)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.taken: set[str] = set()

    def _unique(self, make) -> str:
        for _ in range(1000):
            name = make()
            if name not in self.taken and len(name) > 3:
                self.taken.add(name)
                return name
        raise RuntimeError("name space exhausted; the world is too large for the name generator")

    def person(self) -> str:
        return self._unique(lambda: f"{_word(self.rng, 1, 2)} {_word(self.rng, 2, 3)}")

    def city(self) -> str:
        rng = self.rng
        return self._unique(lambda: _word(rng, 1, 2) + (rng.choice(_CITY_SUFFIXES) if rng.random() < 0.6 else ""))

    def country(self) -> str:
        rng = self.rng
        return self._unique(lambda: rng.choice(_COUNTRY_FORMS).format(_word(rng, 1, 2)))

    def organisation(self, noun: str) -> str:
        return self._unique(lambda: f"{_word(self.rng, 2, 3)} {noun}")

    def university(self, city: str) -> str:
        rng = self.rng
        return self._unique(lambda: rng.choice(_UNIVERSITY_FORMS).format(rng.choice([city, _word(rng, 2, 3)])))

    def product(self) -> str:
        rng = self.rng
        return self._unique(
            lambda: f"{rng.choice(_PRODUCT_WORDS)} {rng.choice('ABCDEFGHKMRSTVXZ')}{rng.randint(1, 99)}"
        )

    def near_duplicate(self, name: str) -> str:
        """A different, unused name that looks like ``name`` (one letter changed, or a word added/altered)."""
        rng = self.rng

        def variant() -> str:
            words = name.split(" ")
            i = rng.randrange(len(words))
            word = words[i]
            if rng.random() < 0.5 and len(word) > 3:
                j = rng.randrange(1, len(word))
                word = word[:j] + rng.choice("aeioulnr") + word[j + 1 :]
            else:
                word = word + rng.choice(["a", "e", "s", "on", "er"])
            words[i] = word
            return " ".join(words)

        return self._unique(variant)
