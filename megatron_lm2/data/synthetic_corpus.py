"""The embedded pretraining corpus: seeded, synthetic, long-context bAbI-style stories.

Each document is a story about a few people who move between places and pick up, pass and drop
objects. The story's facts (one short sentence each) are scattered, in time order, through
thousands of words of neutral filler prose; the document ends with questions whose answers need
those facts:

- ``Where is Mary?``           the place of Mary's last move (one supporting fact)
- ``Where is the apple?``      the holder's current place, or where it was dropped (two or three facts)
- ``Who has the apple?``       the current holder, or ``nobody``

A model can only answer by carrying facts across the filler, which is what LM2's memory is for.
Document ``i`` of seed ``s`` depends on ``(s, i)`` alone, so any subset is reproducible.

API::

    generate_document(index, seed, config=CorpusConfig()) -> SyntheticDocument(id, text, qa)
    iter_documents(count, seed, config=CorpusConfig(), start=0) -> Iterator[SyntheticDocument]
    write_corpus(out_dir, documents, seed, config=CorpusConfig()) -> Path   # OUT/synthetic.jsonl

CLI::

    python -m megatron_lm2.data.synthetic_corpus --out DIR --documents N --seed S [--filler-words W]

The jsonl has one ``{"id", "text", "qa": [{"question", "answer"}]}`` object per line and is the
input of ``lm2-preprocess --json-key text``. (The BABILong / MQAR evaluation generators live in
``megatron_lm2.eval``; this module is the pretraining corpus only.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from megatron_lm2.data.babi_world import BabiWorld
from megatron_lm2.fileio import atomic_open

# Fact vocabulary. Filler prose below never uses these words, so only fact sentences carry them.
PEOPLE = (
    "Mary", "John", "Sandra", "Daniel", "Fred", "Bill", "Julie", "Emma", "Oliver", "Sofia", "Lucas",
    "Amara", "Hiro", "Priya", "Mateo", "Ingrid", "Kwame", "Yusuf", "Elena", "Tomas", "Nadia", "Omar",
    "Greta", "Ravi", "Chloe", "Pablo", "Leila", "Viktor", "Aiko", "Bruno",
)
PLACES = (
    "kitchen", "garden", "office", "bathroom", "bedroom", "hallway", "cellar", "attic", "library",
    "garage", "balcony", "workshop", "greenhouse", "pantry", "studio", "lobby", "courtyard", "barn",
    "laboratory", "chapel",
)
OBJECTS = (
    "apple", "football", "milk", "key", "lantern", "violin", "umbrella", "notebook", "hammer",
    "teapot", "compass", "scarf", "kettle", "candle", "map", "wallet", "telescope", "basket",
    "ribbon", "helmet",
)
MOVE_VERBS = ("went to", "travelled to", "moved to", "journeyed to", "walked to", "ran to")
TAKE_VERBS = ("picked up", "grabbed", "took", "got")
DROP_VERBS = ("dropped", "put down", "left", "discarded")
GIVE_VERBS = ("gave", "handed", "passed")

# Filler prose vocabulary (a small grammar; sentences are grammatical if bland).
_F_SUBJECTS = (
    "river", "mountain", "village", "harbour", "forest", "valley", "city", "desert", "island",
    "meadow", "orchard", "bridge", "tower", "market", "castle", "railway", "canal", "lighthouse",
    "monastery", "plateau", "glacier", "volcano", "cathedral", "university", "museum", "theatre",
    "factory", "vineyard", "quarry", "reservoir", "archive", "observatory", "parliament", "colony",
    "empire", "republic", "kingdom", "province", "council", "guild", "merchant", "farmer", "sailor",
    "painter", "poet", "historian", "engineer", "philosopher", "astronomer", "physician", "weaver",
    "blacksmith", "carpenter", "shepherd", "fisherman", "traveller", "scholar", "chronicler",
    "architect", "mathematician", "botanist", "geologist", "composer", "sculptor", "novelist",
    "economist", "surveyor", "navigator", "pilgrim", "monk", "abbot", "duke", "queen", "emperor",
    "senator", "committee", "expedition", "caravan", "fleet", "regiment", "orchestra", "choir",
    "newspaper", "journal", "treaty", "manuscript", "inscription", "festival", "harvest", "season",
    "winter", "summer", "autumn", "spring", "storm", "drought", "flood", "earthquake", "eclipse",
    "comet", "tide", "current", "breeze", "fog", "frost", "thunder", "rainfall", "sunrise", "sunset",
)
_F_ADJECTIVES = (
    "ancient", "quiet", "distant", "northern", "southern", "eastern", "western", "famous", "modest",
    "enormous", "narrow", "gentle", "bitter", "golden", "silver", "crimson", "pale", "dusty",
    "fertile", "barren", "crowded", "remote", "wealthy", "humble", "curious", "patient", "restless",
    "careful", "generous", "stubborn", "mysterious", "forgotten", "celebrated", "neglected",
    "magnificent", "ordinary", "peculiar", "remarkable", "solemn", "cheerful", "weary", "vivid",
    "fragile", "sturdy", "elegant", "rustic", "medieval", "colonial", "industrial", "provincial",
    "maritime", "alpine", "tropical", "arctic", "volcanic", "coastal", "rural", "urban", "imperial",
    "scholarly", "popular", "obscure", "influential", "controversial", "experimental", "traditional",
    "seasonal", "annual", "occasional", "gradual", "sudden", "steady", "brief", "lengthy", "careless",
    "thoughtful", "brilliant", "dim", "fierce", "mild", "humid", "frozen", "windy", "misty",
)
_F_VERBS = (
    "described", "admired", "ignored", "rebuilt", "surveyed", "painted", "studied", "measured",
    "recorded", "celebrated", "abandoned", "restored", "visited", "crossed", "defended", "governed",
    "explored", "translated", "published", "criticised", "praised", "questioned", "imagined",
    "remembered", "forgot", "welcomed", "resisted", "transformed", "divided", "united", "supplied",
    "protected", "documented", "catalogued", "illustrated", "inspired", "influenced", "shaped",
    "surrounded", "overlooked", "flooded", "sheltered", "nourished", "decorated", "dismantled",
    "mapped", "charted", "examined", "debated", "reconsidered", "funded", "taxed", "traded with",
    "wrote about", "argued over", "sang about", "dreamed of", "waited for", "looked across",
    "sailed past", "rode through", "climbed above", "wandered along", "settled near",
)
_F_ADVERBS = (
    "slowly", "quickly", "rarely", "often", "patiently", "carefully", "eagerly", "reluctantly",
    "quietly", "openly", "gradually", "suddenly", "eventually", "frequently", "seldom", "briefly",
    "warmly", "coldly", "proudly", "nervously", "boldly", "gently", "steadily", "wisely", "foolishly",
)
_F_TIMES = (
    "In the early years", "Long before the railway arrived", "During the long winter",
    "According to the old chronicles", "By the end of the century", "For many generations",
    "In most accounts", "Later that decade", "Some historians argue that", "It is often said that",
    "Every autumn", "At the height of the trade", "After the great storm", "In a letter of that time",
    "Before the treaty was signed", "As the records show", "Within a single season",
)
_F_CONNECTIVES = ("while", "because", "although", "until", "whereas", "since", "and yet", "so that")


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Shape of one story. Defaults give ~2,500 words (~3k tokens with the embedded tokenizer)."""

    filler_words: int = 2500
    """approximate words of filler prose per document; the facts are scattered through it"""
    people: int = 4
    objects: int = 3
    events: int = 10
    """fact sentences after the opening moves (moves, pick-ups, hand-overs, drops)"""
    questions: int = 4


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class SyntheticDocument:
    id: int
    text: str
    qa: tuple[QA, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "qa": [asdict(q) for q in self.qa]}


def _filler_sentence(rng: random.Random) -> str:
    def np_(capital: bool = False) -> str:
        words = ([rng.choice(_F_ADJECTIVES)] if rng.random() < 0.7 else []) + [rng.choice(_F_SUBJECTS)]
        det = rng.choice(("the", "a", "that", "every", "one"))
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        text = " ".join([det] + words)
        return text[0].upper() + text[1:] if capital else text

    form = rng.randrange(5)
    if form == 0:
        s = f"{np_(True)} {rng.choice(_F_VERBS)} {np_()}"
    elif form == 1:
        opener = rng.choice(_F_TIMES)
        opener += "" if opener.endswith("that") else ","
        s = f"{opener} {np_()} {rng.choice(_F_ADVERBS)} {rng.choice(_F_VERBS)} {np_()}"
    elif form == 2:
        s = (f"{np_(True)} {rng.choice(_F_VERBS)} {np_()} {rng.choice(_F_CONNECTIVES)} "
             f"{np_()} {rng.choice(_F_VERBS)} {np_()}")
    elif form == 3:
        s = f"{np_(True)} was {rng.choice(_F_ADJECTIVES)} in {rng.randrange(1200, 1990)}"
    else:
        s = f"{np_(True)} seemed {rng.choice(_F_ADJECTIVES)} and {rng.choice(_F_ADJECTIVES)} to {np_()}"
    return s + "."


class _World(BabiWorld):
    """The corpus's story: a few people, places and objects drawn per document; random moves,
    takes, drops and hand-overs (BabiWorld holds the state and the moves)."""

    def __init__(self, rng: random.Random, config: CorpusConfig):
        people = rng.sample(PEOPLE, config.people)
        places = rng.sample(PLACES, max(3, config.people + 1))
        objects = rng.sample(OBJECTS, config.objects)
        super().__init__(rng, people, places, objects, MOVE_VERBS)

    def step(self) -> None:
        rng = self.rng
        person = rng.choice(self.people)
        here_place = self.place[person]
        held = self.carried(person)
        free = self.lying_free()
        here = [o for o in free if self.object_place[o] == here_place]
        never_taken = [o for o in free if self.object_place[o] is None]
        roll = rng.random()
        if held and roll < 0.25:
            obj = rng.choice(held)
            self.holder[obj] = None  # it stays where it is: the person's place
            self.facts.append(f"{person} {rng.choice(DROP_VERBS)} the {obj}.")
        elif held and roll < 0.4:
            other = rng.choice([p for p in self.people if p != person])
            obj = rng.choice(held)
            # a hand-over needs both in one place: the receiver comes over first
            if self.place[other] != here_place:
                self.move_to(other, here_place)
            self.holder[obj] = other
            self.facts.append(f"{person} {rng.choice(GIVE_VERBS)} the {obj} to {other}.")
        elif (here or never_taken) and roll < 0.7:
            obj = rng.choice(here or never_taken)
            self.holder[obj] = person
            self.note_object_place(obj, here_place)
            self.facts.append(f"{person} {rng.choice(TAKE_VERBS)} the {obj}.")
        else:
            self.move(person)

    def questions(self, count: int) -> list[QA]:
        pool: list[QA] = [QA(f"Where is {p}?", self.place[p]) for p in self.people]
        for o in self.objects:
            if self.object_place[o] is None:
                continue  # never taken: nothing in the story says where it is
            pool.append(QA(f"Where is the {o}?", self.object_place[o]))
            pool.append(QA(f"Who has the {o}?", self.holder[o] or "nobody"))
        return self.rng.sample(pool, min(count, len(pool)))


def generate_document(index: int, seed: int, config: CorpusConfig = CorpusConfig()) -> SyntheticDocument:
    """Document ``index`` of corpus ``seed``: a function of (seed, index, config) only."""
    rng = random.Random(f"lm2-synthetic:{seed}:{index}")
    world = _World(rng, config).place_everyone()
    for _ in range(config.events):
        world.step()
    qa = world.questions(config.questions)

    filler: list[str] = []
    words = 0
    while words < config.filler_words:
        sentence = _filler_sentence(rng)
        filler.append(sentence)
        words += sentence.count(" ") + 1
    # Facts go at sorted random positions, so the story stays in time order across the filler.
    slots = sorted(rng.choices(range(len(filler) + 1), k=len(world.facts)))
    sentences: list[str] = []
    fact_iter = iter(world.facts)
    previous = 0
    for slot in slots:
        sentences.extend(filler[previous:slot])
        sentences.append(next(fact_iter))
        previous = slot
    sentences.extend(filler[previous:])

    paragraphs = []
    for start in range(0, len(sentences), 8):
        paragraphs.append(" ".join(sentences[start:start + 8]))
    body = "\n\n".join(paragraphs)
    questions = "\n".join(f"Question: {q.question}\nAnswer: {q.answer}" for q in qa)
    return SyntheticDocument(index, f"Story {index}.\n\n{body}\n\n{questions}", tuple(qa))


def iter_documents(count: int, seed: int, config: CorpusConfig = CorpusConfig(),
                   start: int = 0) -> Iterator[SyntheticDocument]:
    for index in range(start, start + count):
        yield generate_document(index, seed, config)


def write_corpus(out_dir: str | os.PathLike, documents: int, seed: int,
                 config: CorpusConfig = CorpusConfig(), filename: str = "synthetic.jsonl",
                 progress: bool = False) -> Path:
    """Write ``documents`` stories as jsonl to ``out_dir/filename`` (atomically) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    docs = iter_documents(documents, seed, config)
    if progress:
        from tqdm import tqdm

        docs = tqdm(docs, total=documents, unit="doc", desc="synthetic corpus")
    with atomic_open(path, fsync=False) as f:
        for doc in docs:
            f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_lm2.data.synthetic_corpus",
        description="Write the embedded synthetic long-context corpus (bAbI-style stories in filler) as jsonl.")
    parser.add_argument("--out", required=True, help="output directory; the corpus goes to OUT/synthetic.jsonl")
    parser.add_argument("--documents", type=int, required=True, help="number of stories")
    parser.add_argument("--seed", type=int, default=1234, help="corpus seed (default 1234)")
    parser.add_argument("--filler-words", type=int, default=CorpusConfig.filler_words,
                        help=f"approximate filler words per story (default {CorpusConfig.filler_words})")
    parser.add_argument("--events", type=int, default=CorpusConfig.events,
                        help=f"fact sentences after the opening moves (default {CorpusConfig.events})")
    parser.add_argument("--questions", type=int, default=CorpusConfig.questions,
                        help=f"questions per story (default {CorpusConfig.questions})")
    parser.add_argument("--filename", default="synthetic.jsonl", help="output file name (default synthetic.jsonl)")
    args = parser.parse_args(argv)
    if args.documents < 1:
        parser.error("--documents must be >= 1")
    config = CorpusConfig(filler_words=args.filler_words, events=args.events, questions=args.questions)
    path = write_corpus(args.out, args.documents, args.seed, config, args.filename, progress=True)
    print(f"wrote {args.documents} documents to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


if __name__ == "__main__":
    main()
