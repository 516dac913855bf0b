"""Four synthetic binary sentence tasks for the pretrained-encoder benchmark (``pretrained.py``).

Each needs the encoder itself to change (mean-pooled frozen features with a linear probe do worse than
a fine-tuned expert): the answer depends on how words relate across the sentence, not on which words
occur.

- ``agreement``: "the N near/behind/… the M(s) is/are …": 1 if the verb agrees with the subject N, not with
  the distracting noun M of the other number.
- ``negation``: a verdict under 0, 1 or 2 negations; 1 if the sentence is positive after them.
- ``agent``: "the A chased the B" or "the B was chased by the A", then "did the X do it ?"; 1 if X is the
  one who acted (active or passive voice: word order alone does not tell).
- ``tense``: "yesterday / next week … the A jumped / will jump …": 1 if the verb's tense fits the time.

Three more generators are kept but are not in ``TASK_NAMES``: ``colour`` (two animals with colours, a
question about one: 1 if its colour is warm), ``compare`` (the box and the bag held some apples: 1 if the
box held more) and ``order`` ("P arrived before Q … was X first ?"). Within 80 LP-FT steps (the benchmark
uses 60) the experts did not learn them (colour: full and LoRA experts at the probe's 0.76; order:
OFT at 0.54, probe 0.51; compare: at chance even after 200 steps without the probe start), and a task
whose experts learn nothing makes every merge look perfect in normalised accuracy.

Splits are drawn with a fixed seed per task; train, validation and test share no sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASK_NAMES = ("agreement", "negation", "agent", "tense")

ANIMALS = ["cat", "dog", "fox", "bird", "horse", "mouse", "snake", "frog", "bear", "goat", "duck", "wolf"]
WARM, COOL = ["red", "orange", "yellow"], ["blue", "green", "purple"]
NOUNS = [("key", "keys"), ("book", "books"), ("chair", "chairs"), ("lamp", "lamps"), ("cup", "cups"),
         ("box", "boxes"), ("shoe", "shoes"), ("coin", "coins"), ("map", "maps"), ("bell", "bells")]
PREDICATES = ["on the table", "broken", "very old", "in the kitchen", "missing", "new", "clean", "heavy",
              "on sale", "hidden"]
PREPOSITIONS = ["near", "behind", "beside", "under"]
GOOD, BAD = ["good", "great", "wonderful", "excellent"], ["bad", "awful", "terrible", "boring"]
THINGS = ["film", "meal", "book", "concert", "trip", "game", "show", "hotel", "class", "party"]
INTENSIFIERS = ["", "really ", "quite ", "very ", "truly "]
OPENERS = ["", "honestly , ", "i think ", "we agreed that "]
FRUITS = ["apples", "pears", "eggs", "stones"]
HELD = ["held", "had", "contained"]
VERBS = [("chased", "chased"), ("bit", "bitten"), ("saw", "seen"), ("followed", "followed"), ("pushed", "pushed"),
         ("helped", "helped"), ("found", "found"), ("called", "called")]
NAMES = ["anna", "ben", "carl", "emma", "jack", "kate", "mark", "lucy", "paul", "sara", "tom", "nina", "john", "mary",
         "peter", "susan", "david", "laura", "james", "helen"]
PAST_TIMES, FUTURE_TIMES = ["yesterday", "last week", "earlier today"], ["tomorrow", "next week", "later tonight"]
ACTIONS = [("jumped", "will jump"), ("slept", "will sleep"), ("played", "will play"), ("waited", "will wait"),
           ("rested", "will rest"), ("walked", "will walk"), ("hid", "will hide"), ("ate", "will eat"),
           ("swam", "will swim"), ("sang", "will sing")]
PLACES = ["in the garden", "by the river", "near the house", "in the barn", "under the tree"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


@dataclass(frozen=True)
class Split:
    sentences: list[str]
    labels: list[int]


def _colour(r: random.Random) -> tuple[str, int]:
    a1, a2 = r.sample(ANIMALS, 2)
    c1, c2 = r.choice(WARM + COOL), r.choice(WARM + COOL)
    pairs = [(a1, c1), (a2, c2)]
    r.shuffle(pairs)
    parts = [f"the {a} is {c}" if r.random() < 0.5 else f"the {c} one is the {a}" for a, c in pairs]
    ask = r.choice(pairs)
    return f"{parts[0]} and {parts[1]} . what about the {ask[0]} ?", int(ask[1] in WARM)


def _agreement(r: random.Random) -> tuple[str, int]:
    (n_sg, n_pl), (m_sg, m_pl) = r.sample(NOUNS, 2)
    plural = r.random() < 0.5
    subject, distractor = (n_pl, m_sg) if plural else (n_sg, m_pl)
    correct = r.random() < 0.5
    verb = ("are" if plural else "is") if correct else ("is" if plural else "are")
    return f"the {subject} {r.choice(PREPOSITIONS)} the {distractor} {verb} {r.choice(PREDICATES)}", int(correct)


def _negation(r: random.Random) -> tuple[str, int]:
    positive = r.random() < 0.5
    negations = r.choice([0, 1, 2])
    word = r.choice(INTENSIFIERS) + r.choice(GOOD if positive else BAD)
    thing, opener = r.choice(THINGS), r.choice(OPENERS)
    if negations == 0:
        text = f"{opener}the {thing} was {word}"
    elif negations == 1:
        text = f"{opener}the {thing} was not {word}"
    else:
        text = f"{opener}it is not true that the {thing} was not {word}"
    return text, int(positive == (negations % 2 == 0))


def _compare(r: random.Random) -> tuple[str, int]:
    n_box, n_bag = r.sample(range(len(NUMBERS)), 2)
    fruit, held = r.choice(FRUITS), r.choice(HELD)
    box, bag = f"the box {held} {NUMBERS[n_box]} {fruit}", f"the bag {held} {NUMBERS[n_bag]} {fruit}"
    first, second = (box, bag) if r.random() < 0.5 else (bag, box)
    return f"{first} {r.choice(['and', 'while', 'but'])} {second} . did the box hold more ?", int(n_box > n_bag)


def _agent(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(ANIMALS, 2)
    past, participle = r.choice(VERBS)
    text = f"the {a} {past} the {b}" if r.random() < 0.5 else f"the {b} was {participle} by the {a}"
    ask = r.choice([a, b])
    return f"{text} . did the {ask} do it ?", int(ask == a)


def _tense(r: random.Random) -> tuple[str, int]:
    past_time = r.random() < 0.5
    when = r.choice(PAST_TIMES if past_time else FUTURE_TIMES)
    past, future = r.choice(ACTIONS)
    consistent = r.random() < 0.5
    verb = (past if past_time else future) if consistent else (future if past_time else past)
    return f"{when} the {r.choice(ANIMALS)} {verb} {r.choice(PLACES)}", int(consistent)


def _order(r: random.Random) -> tuple[str, int]:
    first, later = r.sample(NAMES, 2)
    text = r.choice([f"{first} arrived before {later}", f"{later} arrived after {first}",
                     f"{later} came in later than {first}", f"{first} came in earlier than {later}",
                     f"{first} got there before {later}", f"{later} got there after {first}"])
    ask = r.choice([first, later])
    return f"{text} . was {ask} first ?", int(ask == first)


GENERATORS = {"colour": _colour, "agreement": _agreement, "negation": _negation, "compare": _compare,
              "agent": _agent, "order": _order, "tense": _tense}


def make_splits(task: str, seed: int, sizes: tuple[int, int, int]) -> tuple[Split, Split, Split]:
    """(train, validation, test) of ``sizes`` examples with no sentence in two splits (or twice)."""
    r = random.Random(f"{task}:{seed}")
    seen: set[str] = set()
    splits = []
    for n in sizes:
        sentences, labels = [], []
        attempts = 0
        while len(sentences) < n:
            attempts += 1
            if attempts > 100 * n:
                raise RuntimeError(f"task {task}: not enough distinct sentences for {sizes}")
            text, label = GENERATORS[task](r)
            if text in seen:
                continue
            seen.add(text)
            sentences.append(text)
            labels.append(label)
        splits.append(Split(sentences, labels))
    return splits[0], splits[1], splits[2]
