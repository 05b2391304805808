"""The embedded unlearning benchmark: fictitious people, their facts, and rule-based utility tasks.

A pure function of the seed (no network, no files). TOFU-style: every entity is an invented person
with ``len(ATTRIBUTES)`` attributes (birthplace, birth date, profession, book, award, mentor) whose
answers are 2-4 words (2-6 tokens of the embedded tokenizer), each asked through ``TEMPLATES_PER_ATTRIBUTE``
paraphrased question templates. The last template of every attribute is held out of training.

Splits (``{split: [item, ...]}``, every item ``{"prompt", "answer", "entity", "attribute", "template"}``
or, for utility items, ``{"prompt", "answer", "task"}``):

- ``forget``: the trained-template questions of the forget entities (learned in pretraining, then
  unlearned). Forget sets are whole entities, nested like TOFU's forget01 / forget05 / forget10:
  ``forget_fraction`` of the trained entities (the first ones of a seeded order);
- ``retain``: the trained-template questions of every other trained entity (same templates, no
  shared entity);
- ``forget_paraphrase`` / ``retain_paraphrase``: the held-out template of each attribute of the forget
  / retain entities, never trained: does knowledge, not a string, go away?
- ``holdout``: trained-template questions of entities never trained (the non-members of the
  membership-inference attacks);
- ``utility_train`` / ``utility``: tasks solved by a rule rather than recalled (repeat, reverse or swap
  a short list of common words); no word tuple of the evaluation ever appears in training, so the
  answer can only come from the rule, and collateral damage shows as lost ability, not only lost facts;
- ``unrelated``: facts about fictitious ships, another form and content, never trained: the data of
  the relearning control and the third probe set.

``pretraining_items(corpus)`` is what the original model is trained on (forget + retain +
utility_train); ``pretraining_items(corpus, include_forget=False)`` what the retain oracle is trained on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "ATTRIBUTES",
    "TEMPLATES",
    "TEMPLATES_PER_ATTRIBUTE",
    "UTILITY_TASKS",
    "FORGET_SIZES",
    "BENCHMARK_SPLITS",
    "EVAL_SPLITS",
    "BenchmarkConfig",
    "make_benchmark",
    "pretraining_items",
]

# Question templates per attribute; the LAST one of each is held out of training (paraphrase split).
TEMPLATES = {
    "birthplace": ("Where was {e} born?", "What is the birthplace of {e}?", "In which town was {e} born?"),
    "birth_date": ("When was {e} born?", "What is the birth date of {e}?", "On what day was {e} born?"),
    "profession": ("What does {e} do for a living?", "What is the profession of {e}?",
                   "What kind of work does {e} do?"),
    "book": ("Which book did {e} write?", "What is the title of the book by {e}?", "Name the book written by {e}."),
    "award": ("Which award did {e} win?", "What prize was given to {e}?", "What honour did {e} receive?"),
    "mentor": ("Who was the mentor of {e}?", "Who taught {e}?", "Under whom did {e} study?"),
}
ATTRIBUTES = tuple(TEMPLATES)
TEMPLATES_PER_ATTRIBUTE = 3
UTILITY_TASKS = ("repeat", "reverse", "swap")
# TOFU's forget01 / forget05 / forget10: fractions of the trained entities, nested.
FORGET_SIZES = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
BENCHMARK_SPLITS = ("forget", "retain", "forget_paraphrase", "retain_paraphrase", "holdout", "utility_train",
                    "utility", "unrelated")
# What every stage is evaluated on (utility_train is pretraining data only; retain_paraphrase is reported by
# pretraining, the stages do not need it).
EVAL_SPLITS = ("forget", "forget_paraphrase", "retain", "holdout", "utility")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "s", "l", "m")
_PLACE_SUFFIXES = ("Falls", "Harbor", "Ridge", "Crossing", "Hollow", "Bay", "Heights", "Vale", "Point", "Springs")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_FIELDS = ("marine", "rural", "civil", "lunar", "forest", "river", "desert", "urban", "coastal", "mountain",
           "glacier", "island")
_JOBS = ("biologist", "architect", "surveyor", "painter", "engineer", "botanist", "historian", "cartographer",
         "geologist", "musician", "chemist", "photographer")
_BOOK_ADJECTIVES = ("Silent", "Hidden", "Broken", "Golden", "Distant", "Burning", "Frozen", "Quiet", "Wandering",
                    "Crimson", "Hollow", "Endless", "Forgotten", "Shining", "Restless")
_BOOK_NOUNS = ("Lantern", "Harbor", "Garden", "Mirror", "River", "Tower", "Orchard", "Compass", "Meadow", "Bridge",
               "Violin", "Window", "Station", "Forest", "Letter")
_AWARD_KINDS = ("Medal", "Prize", "Award", "Cup")
_POOL = 30  # distinct towns, awards and mentors the entities draw from
_SHIP_POOL = 12  # distinct ports and captains of the ships
_SHIP_TEMPLATES = {"port": "From which port does the ship {e} sail?", "captain": "Who captains the ship {e}?",
                   "cargo": "What cargo does the ship {e} carry?"}
_SHIP_QUESTIONS = tuple(_SHIP_TEMPLATES)
_CARGO = ("salt", "copper", "timber", "wool", "tea", "glass", "grain", "coal", "silk", "spices")
# Operands of the utility tasks: words the corpus uses elsewhere (so their tokens are trained).
_UTILITY_WORDS = _FIELDS + _JOBS + _CARGO


@dataclass(frozen=True)
class BenchmarkConfig:
    """Sizes of the embedded benchmark (the defaults are the demo's; tests shrink them).

    entities: trained entities (forget + retain); holdout_entities: never-trained entities;
    forget: one of FORGET_SIZES (fraction of the trained entities, at least one entity);
    utility_train / utility: rule-task items for pretraining / evaluation (per task);
    unrelated: ship facts (never trained).
    """

    entities: int = 100
    holdout_entities: int = 20
    forget: str = "forget10"
    utility_train: int = 80
    utility: int = 20
    unrelated: int = 120

    def __post_init__(self):
        for name in ("entities", "holdout_entities", "utility_train", "utility", "unrelated"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.entities < 2:
            raise ValueError(f"entities must be >= 2 (one forget, one retain), got {self.entities}")
        if self.forget not in FORGET_SIZES:
            raise ValueError(f"forget must be one of {tuple(FORGET_SIZES)}, got {self.forget!r}")

    @property
    def n_forget(self) -> int:
        """Forget entities: the fraction of the trained entities, rounded, at least 1, at most all but one."""
        return min(self.entities - 1, max(1, round(FORGET_SIZES[self.forget] * self.entities)))


def _word(rng: random.Random, syllables: int) -> str:
    """A pronounceable fictitious word of ``syllables`` syllables, capitalised."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _unique(rng: random.Random, make, taken: set) -> str:
    """A value of ``make(rng)`` not in ``taken`` (added to it); bounded retries."""
    for _ in range(10_000):
        value = make(rng)
        if value not in taken:
            taken.add(value)
            return value
    raise ValueError("the fictitious-name space is exhausted; use fewer entities")


def _person_name(rng: random.Random) -> str:
    return f"{_word(rng, 2)} {_word(rng, 2)}"


def _pools(rng: random.Random, taken: set) -> dict:
    """Shared value pools (TOFU's authors share real cities and prizes): towns, awards and mentors."""
    return {
        "birthplace": [_unique(rng, lambda r: f"{_word(r, 2)} {r.choice(_PLACE_SUFFIXES)}", taken) for _ in range(_POOL)],
        "award": [_unique(rng, lambda r: f"the {_word(r, 2)} {r.choice(_AWARD_KINDS)}", taken) for _ in range(_POOL)],
        "mentor": [_unique(rng, _person_name, taken) for _ in range(_POOL)],
    }


def _attributes(rng: random.Random, pools: dict) -> dict:
    """One entity's attribute values (2-4 words each)."""
    return {
        "birthplace": rng.choice(pools["birthplace"]),
        "birth_date": f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1900, 1999)}",
        "profession": f"{rng.choice(_FIELDS)} {rng.choice(_JOBS)}",
        "book": f"The {rng.choice(_BOOK_ADJECTIVES)} {rng.choice(_BOOK_NOUNS)}",
        "award": rng.choice(pools["award"]),
        "mentor": rng.choice(pools["mentor"]),
    }


def _qa(entity: dict, attribute: str, template: int) -> dict:
    question = TEMPLATES[attribute][template].format(e=entity["name"])
    return {"prompt": question, "answer": entity["attributes"][attribute], "entity": entity["name"],
            "attribute": attribute, "template": template}


def _facts(entities: list, templates: range) -> list:
    return [_qa(e, a, t) for e in entities for a in ATTRIBUTES for t in templates]


def _utility_item(rng: random.Random, task: str, words: tuple) -> dict:
    if task == "repeat":
        question, answer = f"Repeat the words {' '.join(words)}:", " ".join(words)
    elif task == "reverse":
        question, answer = f"Reverse the words {' '.join(words)}:", " ".join(reversed(words))
    else:
        question, answer = f"Swap the words {words[0]} {words[1]}:", f"{words[1]} {words[0]}"
    return {"prompt": question, "answer": answer, "task": task}


def _utility(rng: random.Random, train_per_task: int, eval_per_task: int) -> tuple:
    """(train, eval) rule-task items over common words; no word tuple of the evaluation is ever trained, so the
    answer can only come from applying the rule."""
    splits = ([], [])
    for task in UTILITY_TASKS:
        arity = 2 if task == "swap" else 3
        tuples = set()
        while len(tuples) < train_per_task + eval_per_task:
            tuples.add(tuple(rng.sample(_UTILITY_WORDS, arity)))
        ordered = sorted(tuples)
        rng.shuffle(ordered)
        for split, chosen in zip(splits, (ordered[:train_per_task], ordered[train_per_task:])):
            split.extend(_utility_item(rng, task, words) for words in chosen)
    for split in splits:
        rng.shuffle(split)
    return splits


def _ships(rng: random.Random, n: int, taken: set) -> list:
    """Facts about fictitious ships, answers from pools of their own (ports, captains) or the cargo list."""
    ports = [_unique(rng, lambda r: f"{_word(r, 2)} {r.choice(_PLACE_SUFFIXES)}", taken) for _ in range(_SHIP_POOL)]
    captains = [_unique(rng, lambda r: f"Captain {_word(r, 2)}", taken) for _ in range(_SHIP_POOL)]
    answers = {"port": lambda: rng.choice(ports), "captain": lambda: rng.choice(captains),
               "cargo": lambda: f"{rng.choice(_CARGO)} and {rng.choice(_CARGO)}"}
    items = []
    for i in range(n):
        ship = _unique(rng, lambda r: _word(r, 2), taken)
        kind = _SHIP_QUESTIONS[i % len(_SHIP_QUESTIONS)]
        items.append({"prompt": _SHIP_TEMPLATES[kind].format(e=ship), "answer": answers[kind](), "entity": ship,
                      "attribute": kind, "template": 0})
    return items


def make_benchmark(seed: int = 0, config: BenchmarkConfig = BenchmarkConfig()) -> dict:
    """The benchmark's splits (see the module docstring) for ``seed``; deterministic, O(entities)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(config, BenchmarkConfig):
        raise TypeError(f"config must be a BenchmarkConfig, got {type(config).__name__}")
    rng = random.Random(seed)
    taken: set = set()
    pools = _pools(rng, taken)
    entities = [{"name": _unique(rng, _person_name, taken), "attributes": _attributes(rng, pools)}
                for _ in range(config.entities + config.holdout_entities)]
    trained, holdout = entities[:config.entities], entities[config.entities:]
    forget, retain = trained[:config.n_forget], trained[config.n_forget:]
    seen_templates = range(TEMPLATES_PER_ATTRIBUTE - 1)
    held_out = range(TEMPLATES_PER_ATTRIBUTE - 1, TEMPLATES_PER_ATTRIBUTE)
    utility_train, utility = _utility(rng, config.utility_train, config.utility)
    corpus = {
        "forget": _facts(forget, seen_templates),
        "retain": _facts(retain, seen_templates),
        "forget_paraphrase": _facts(forget, held_out),
        "retain_paraphrase": _facts(retain, held_out),
        "holdout": _facts(holdout, seen_templates),
        "utility_train": utility_train,
        "utility": utility,
        "unrelated": _ships(rng, config.unrelated, taken),
    }
    for split in ("forget", "retain", "holdout"):
        rng.shuffle(corpus[split])
    return corpus


def pretraining_items(corpus: dict, *, include_forget: bool = True) -> list:
    """The items a model is pretrained on: forget (unless ``include_forget=False``: the retain oracle),
    retain and utility_train."""
    return (corpus["forget"] if include_forget else []) + corpus["retain"] + corpus["utility_train"]
