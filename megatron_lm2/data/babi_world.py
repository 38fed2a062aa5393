"""The bAbI-style world behind both story generators: the pretraining corpus
(megatron_lm2.data.synthetic_corpus) and the BABILong-style evaluation data
(megatron_lm2.eval.babilong_gen).

It holds where each person is, who holds each object, where each object is (its holder's place,
or where it was left), the places each object has been, and the fact sentences that record every
change. Each generator adds its own events (what may happen, and how it is phrased) on top; the
random draws here are the ones both made before they shared this class, in the same order, so
their outputs for a fixed seed did not change (tests/test_synthetic_corpus.py holds them).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence


class BabiWorld:
    def __init__(
        self,
        rng: random.Random,
        people: Sequence[str],
        places: Sequence[str],
        objects: Sequence[str],
        move_verbs: Sequence[str],
    ):
        self.rng = rng
        self.people = list(people)
        self.places = list(places)
        self.objects = list(objects)
        self.move_verbs = tuple(move_verbs)
        self.place: dict[str, Optional[str]] = {p: None for p in self.people}
        self.holder: dict[str, Optional[str]] = {o: None for o in self.objects}
        # Where the object is: its holder's place while held, where it was left after; None
        # until someone first takes it.
        self.object_place: dict[str, Optional[str]] = {o: None for o in self.objects}
        self.object_trail: dict[str, list[str]] = {o: [] for o in self.objects}
        self.facts: list[str] = []

    # ------------------------------------------------------------------------ state
    def carried(self, person: str) -> list[str]:
        return [o for o in self.objects if self.holder[o] == person]

    def lying_free(self) -> list[str]:
        """Objects nobody holds, in object order."""
        return [o for o in self.objects if self.holder[o] is None]

    def note_object_place(self, obj: str, place: Optional[str]) -> None:
        self.object_place[obj] = place
        if place is not None and (not self.object_trail[obj] or self.object_trail[obj][-1] != place):
            self.object_trail[obj].append(place)

    # ------------------------------------------------------------------------ events
    def move_to(self, person: str, place: str) -> None:
        """`person` goes to `place`, carrying what they hold; one fact sentence."""
        self.place[person] = place
        for obj in self.carried(person):
            self.note_object_place(obj, place)
        self.facts.append(f"{person} {self.rng.choice(self.move_verbs)} the {place}.")

    def move(self, person: Optional[str] = None) -> None:
        """`person` (a random one if None) goes to a random other place."""
        person = person or self.rng.choice(self.people)
        self.move_to(person, self.rng.choice([p for p in self.places if p != self.place[person]]))

    def place_everyone(self) -> "BabiWorld":
        """The usual opening: each person, in order, goes somewhere."""
        for person in self.people:
            self.move(person)
        return self
