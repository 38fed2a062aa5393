"""BABILong-style samples without downloads: bAbI-like stories for qa1-qa10, scattered
through filler text of any length. Deterministic given the seed.

    generate_sample("qa2", length_tokens=8000, seed=3)
        -> {"input": ..., "question": ..., "target": ...}

The stories follow the bAbI tasks (Weston et al. 2015): a small world of people, places and
objects is simulated fact by fact, and the question is answered from the simulated state,
so every target is right by construction. BABILong hides the facts among PG-19 sentences;
here the filler is synthetic prose (or any text file you pass), which keeps the samples
self-contained. Lengths count tokens with the `count_tokens` you give (default: words and
punctuation, roughly a BPE token count for English).
"""

from __future__ import annotations

import os
import random
import re
from typing import Callable, Optional, Sequence

from megatron_lm2.data.babi_world import BabiWorld
from megatron_lm2.eval.answers import TASKS
from megatron_lm2.fileio import write_json_atomic

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
GIVERS = ("Bill", "Fred", "Jeff", "Mary")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKES = ("picked up", "got", "grabbed", "took")
DROPS = ("dropped", "discarded", "put down", "left")
GIVES = ("gave", "handed", "passed")
NUMBERS = ("none", "one", "two", "three")
DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}

_FILLER_WORDS = (
    "the old house stood at the end of a long road and nobody in the village could remember who "
    "had built it there were stories about the family that once lived inside and about the winter "
    "when the river froze so hard that the carts crossed it for a month the children used to walk "
    "past quickly while the dogs barked at nothing in the dark windows a letter arrived one morning "
    "with a seal that no one recognised and the postman said he had carried it across three "
    "counties the baker thought it was a joke but the schoolmaster read it twice and went pale"
).split()


def count_words(text: str) -> int:
    """Default length measure: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


class Filler:
    """An endless, seeded stream of filler sentences: synthetic prose, or the sentences of a
    text file (cycled from a seeded offset)."""

    def __init__(self, rng: random.Random, text_file: Optional[str] = None):
        self.rng = rng
        self.sentences: Optional[list[str]] = None
        if text_file is not None:
            with open(text_file, encoding="utf-8") as f:
                text = f.read()
            self.sentences = [s.strip() + "." for s in re.split(r"[.!?]\s+", text) if s.strip()]
            if not self.sentences:
                raise ValueError(f"filler file {text_file} holds no sentences")
            self.position = rng.randrange(len(self.sentences))

    def next(self) -> str:
        if self.sentences is not None:
            sentence = self.sentences[self.position % len(self.sentences)]
            self.position += 1
            return sentence
        n = self.rng.randint(6, 16)
        start = self.rng.randrange(len(_FILLER_WORDS))
        words = [_FILLER_WORDS[(start + i) % len(_FILLER_WORDS)] for i in range(n)]
        return " ".join(words).capitalize() + "."


# ------------------------------------------------------------------------------ stories
class _World(BabiWorld):
    """BABILong's stories: the benchmark's four people, six places and three objects; takes and
    drops phrased with "there", hand-overs only between people in one place."""

    def __init__(self, rng: random.Random, people=PEOPLE):
        super().__init__(rng, people, PLACES, OBJECTS, MOVES)

    @classmethod
    def with_everyone_placed(cls, rng: random.Random, people=PEOPLE) -> "_World":
        """A world whose story opens by moving each person somewhere."""
        return cls(rng, people).place_everyone()

    def take(self) -> bool:
        free = self.lying_free()
        present = [p for p in self.people if self.place[p] is not None]
        if not free or not present:
            return False
        person, obj = self.rng.choice(present), self.rng.choice(free)
        self.holder[obj] = person
        self.note_object_place(obj, self.place[person])
        self.facts.append(f"{person} {self.rng.choice(TAKES)} the {obj} there.")
        return True

    def drop(self) -> bool:
        held = [o for o in OBJECTS if self.holder[o] is not None]
        if not held:
            return False
        obj = self.rng.choice(held)
        person = self.holder[obj]
        self.holder[obj] = None
        self.facts.append(f"{person} {self.rng.choice(DROPS)} the {obj} there.")
        return True

    def give(self) -> bool:
        held = [o for o in OBJECTS if self.holder[o] is not None]
        self.rng.shuffle(held)
        for obj in held:
            giver = self.holder[obj]
            others = [p for p in self.people if p != giver and self.place[p] == self.place[giver]]
            if others:
                receiver = self.rng.choice(others)
                self.holder[obj] = receiver
                self.facts.append(f"{giver} {self.rng.choice(GIVES)} the {obj} to {receiver}.")
                return True
        return False

    def random_event(self, weights=(5, 2, 1, 1)) -> None:
        kind = self.rng.choices(("move", "take", "drop", "give"), weights=weights)[0]
        ok = {"move": lambda: self.move() or True, "take": self.take, "drop": self.drop,
              "give": self.give}[kind]()
        if not ok:
            self.move()


def _qa1(rng):
    w = _World.with_everyone_placed(rng)
    for _ in range(rng.randint(0, 6)):
        w.move()
    person = rng.choice(w.people)
    return w.facts, f"Where is {person}?", w.place[person]


def _qa2(rng):
    w = _World.with_everyone_placed(rng)
    while True:
        for _ in range(rng.randint(3, 8)):
            w.random_event(weights=(4, 3, 1, 0))
        placed = [o for o in OBJECTS if w.object_place[o] is not None]
        if placed:
            obj = rng.choice(placed)
            return w.facts, f"Where is the {obj}?", w.object_place[obj]


def _qa3(rng):
    w = _World.with_everyone_placed(rng)
    for _ in range(200):
        w.random_event(weights=(5, 3, 1, 0))
        movers = [o for o in OBJECTS if len(w.object_trail[o]) >= 2]
        if movers and rng.random() < 0.3:
            obj = rng.choice(movers)
            trail = w.object_trail[obj]
            return w.facts, f"Where was the {obj} before the {trail[-1]}?", trail[-2]
    raise RuntimeError("qa3 story did not converge")  # pragma: no cover (200 events suffice)


def _qa4(rng):
    a, b, c = rng.sample(PLACES, 3)
    d1, d2 = rng.sample(sorted(DIRECTIONS), 2)
    facts = [f"The {a} is {d1} of the {b}.", f"The {c} is {d2} of the {b}."]
    rng.shuffle(facts)
    if rng.random() < 0.5:  # "What is the b d1-opposite of?" -> a's relation, seen from b
        return facts, f"What is the {b} {DIRECTIONS[d1]} of?", a
    return facts, f"What is {d2} of the {b}?", c


def _qa5(rng):
    w = _World.with_everyone_placed(rng, people=GIVERS)
    gifts = []
    for _ in range(rng.randint(4, 9)):
        before = len(w.facts)
        w.random_event(weights=(2, 2, 1, 4))
        if len(w.facts) > before and " to " in w.facts[-1] and any(g in w.facts[-1] for g in GIVES):
            gifts.append(w.facts[-1])
    while not gifts:
        w.take() or w.move()
        if w.give():
            gifts.append(w.facts[-1])
    giver, _, rest = gifts[-1].partition(" ")
    obj = re.search(r"the (\w+) to", rest).group(1)
    receiver = rest.rstrip(".").split(" to ")[-1]
    form = rng.randrange(4)
    if form == 0:
        return w.facts, f"Who gave the {obj} to {receiver}?", giver
    if form == 1:
        return w.facts, f"Who did {giver} give the {obj} to?", receiver
    if form == 2:
        return w.facts, f"What did {giver} give to {receiver}?", obj
    return w.facts, f"Who received the {obj}?", receiver


def _qa6(rng):
    w = _World.with_everyone_placed(rng)
    for _ in range(rng.randint(0, 4)):
        w.move()
    person = rng.choice(w.people)
    place = w.place[person] if rng.random() < 0.5 else rng.choice([p for p in PLACES if p != w.place[person]])
    return w.facts, f"Is {person} in the {place}?", "yes" if place == w.place[person] else "no"


def _carrying_story(rng):
    w = _World.with_everyone_placed(rng)
    for _ in range(rng.randint(2, 8)):
        w.random_event(weights=(2, 4, 2, 2))
    return w


def _qa7(rng):
    w = _carrying_story(rng)
    person = rng.choice(w.people)
    return w.facts, f"How many objects is {person} carrying?", NUMBERS[len(w.carried(person))]


def _qa8(rng):
    w = _carrying_story(rng)
    person = rng.choice(w.people)
    held = w.carried(person)
    return w.facts, f"What is {person} carrying?", ",".join(held) if held else "nothing"


def _qa9(rng):
    facts, place = [], {}
    for _ in range(rng.randint(2, 6)):
        person, where = rng.choice(PEOPLE), rng.choice(PLACES)
        if rng.random() < 0.35:
            facts.append(f"{person} is not in the {where}.")
            place[person] = ("not", where)
        else:
            facts.append(f"{person} {rng.choice(MOVES + ('is in',))} the {where}.")
            place[person] = ("in", where)
    person = rng.choice(sorted(place))
    kind, where = place[person]
    if kind == "not":
        return facts, f"Is {person} in the {where}?", "no"
    asked = where if rng.random() < 0.5 else rng.choice([p for p in PLACES if p != where])
    return facts, f"Is {person} in the {asked}?", "yes" if asked == where else "no"


def _qa10(rng):
    facts, place = [], {}
    for _ in range(rng.randint(2, 6)):
        person = rng.choice(PEOPLE)
        if rng.random() < 0.4:
            a, b = rng.sample(PLACES, 2)
            facts.append(f"{person} is either in the {a} or the {b}.")
            place[person] = {a, b}
        else:
            where = rng.choice(PLACES)
            facts.append(f"{person} {rng.choice(MOVES + ('is in',))} the {where}.")
            place[person] = {where}
    person = rng.choice(sorted(place))
    options = place[person]
    asked = rng.choice(sorted(options)) if rng.random() < 0.6 else rng.choice(PLACES)
    if asked not in options:
        target = "no"
    else:
        target = "yes" if len(options) == 1 else "maybe"
    return facts, f"Is {person} in the {asked}?", target


STORIES: dict[str, Callable] = {
    "qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5,
    "qa6": _qa6, "qa7": _qa7, "qa8": _qa8, "qa9": _qa9, "qa10": _qa10,
}
assert tuple(STORIES) == TASKS


# ------------------------------------------------------------------------------ samples
def parse_length(length: str | int) -> int:
    """'0k', '4k', '128k', '1M' or an int -> tokens (k = 1024, as BABILong's names)."""
    if isinstance(length, int):
        return length
    match = re.fullmatch(r"(\d+)([kKmM]?)", length.strip())
    if not match:
        raise ValueError(f"bad length {length!r}: expected e.g. 0k, 8k, 128k, 1M or a number")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    return int(match.group(1)) * scale


def generate_sample(
    task: str,
    length_tokens: int | str,
    seed: int,
    count_tokens: Callable[[str], int] = count_words,
    filler_file: Optional[str] = None,
) -> dict:
    """One sample: the story's facts, in order, at random places in filler text so that the
    context is about `length_tokens` long (never shorter than the facts themselves)."""
    if task not in STORIES:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(STORIES)}")
    rng = random.Random(f"{task}/{seed}")
    facts, question, target = STORIES[task](rng)
    budget = parse_length(length_tokens) - sum(count_tokens(f) for f in facts)
    filler = Filler(random.Random(f"{task}/{seed}/filler"), filler_file)
    noise: list[str] = []
    while budget > 0:
        sentence = filler.next()
        noise.append(sentence)
        budget -= count_tokens(sentence)
    # Facts keep their order; each lands after a random number of filler sentences.
    cuts = sorted(rng.randint(0, len(noise)) for _ in facts)
    pieces, start = [], 0
    for cut, fact in zip(cuts, facts):
        pieces.extend(noise[start:cut])
        pieces.append(fact)
        start = cut
    pieces.extend(noise[start:])
    return {"input": " ".join(pieces), "question": question, "target": target}


def generate_split(task: str, length: str | int, num_samples: int, seed: int = 0, **kwargs) -> list[dict]:
    return [generate_sample(task, length, seed * 1_000_003 + i, **kwargs) for i in range(num_samples)]


def write_dataset(
    root: str,
    tasks: Sequence[str],
    lengths: Sequence[str],
    num_samples: int,
    seed: int = 0,
    **kwargs,
) -> list[str]:
    """Write samples in the benchmark's JSON layout, root/data/{task}/{length}.json (a JSON
    array of records), atomically. Returns the files written."""
    written = []
    for task in tasks:
        for length in lengths:
            path = os.path.join(root, "data", task, f"{length}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            records = generate_split(task, length, num_samples, seed, **kwargs)
            write_json_atomic(path, records, fsync=False)
            written.append(path)
    return written
