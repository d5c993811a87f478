"""The demo prefixes' tasks: generates their datasets (no downloads) and records how each prefix was trained.

Three tasks for the embedded SmolLM2-135M-Instruct, each a chat dataset (`{"messages": [...]}` per line) whose user
turn is the bare input, so the prefix alone must carry the task:
- `json_extract` (format): a sentence about a person in, a JSON object with fixed keys out;
- `pirate` (style): a plain sentence in, the same sentence in pirate speak out;
- `e2e_restaurant` (table-to-text, in the spirit of the E2E task of the prefix-tuning paper): an attribute record
  in, a fluent description out.

`python -m engine.training.demo_data` writes `train.jsonl` and `test.jsonl` into `engine/demo_prefixes/<task>/`;
`--train` then trains each prefix there with `prefix-serve train`, using the settings recorded below.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.model_loader import DEMO_PREFIX_DIR



@dataclass(frozen=True)
class DemoTask:
    """One demo task: its data generator, the instruction a base model gets instead, and its training recipe."""

    name: str
    kind: str  # "format", "style" or "table-to-text"
    make_pair: Callable[[random.Random], tuple[str, str]]  # -> (user input, reference answer)
    instruction: str  # prepended to the input for the base model's plain instruction prompt
    metric: str  # the task's headline metric: "format_rate", "exact_match" or "rougeL"
    init_text: str  # the prefix starts as this text's KV cache (`--init-text`)
    json_keys: tuple[str, ...] = ()
    num_train: int = 240
    num_test: int = 60
    budget: tuple[str, ...] = ("--steps", "40", "--batch-size", "8")  # shared with the full fine-tune baseline
    prefix_args: tuple[str, ...] = ("--num-virtual-tokens", "16", "--lr", "3e-2")

    @property
    def directory(self) -> Path:
        return DEMO_PREFIX_DIR / self.name


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


# --- json_extract: a sentence about a person -> {"name", "age", "job", "city"} -----------------------------------

_FIRST = ["Maria", "Tom", "Aiko", "Lars", "Priya", "Omar", "Chloe", "Diego", "Hannah", "Kwame", "Sofia", "Ivan",
          "Leila", "Mateo", "Grace", "Yusuf", "Elena", "Noah", "Mei", "Samuel", "Ingrid", "Ravi", "Zoe", "Pablo",
          "Amara", "Felix", "Nadia", "Oscar", "Julia", "Kenji"]
_LAST = ["Lopez", "Becker", "Tanaka", "Nilsson", "Sharma", "Haddad", "Martin", "Alvarez", "Schmidt", "Mensah",
         "Rossi", "Petrov", "Karimi", "Silva", "Okafor", "Demir", "Novak", "Walsh", "Chen", "Adeyemi", "Berg",
         "Iyer", "Fischer", "Moreno", "Kowalski", "Dubois", "Hughes", "Costa", "Park", "Jensen"]
_JOBS = ["architect", "baker", "nurse", "teacher", "engineer", "pilot", "chef", "lawyer", "plumber", "dentist",
         "journalist", "farmer", "librarian", "electrician", "pharmacist", "designer", "firefighter", "accountant",
         "photographer", "mechanic", "biologist", "translator", "carpenter", "surgeon", "musician"]
_CITIES = ["Madrid", "Hamburg", "Osaka", "Oslo", "Mumbai", "Cairo", "Lyon", "Lima", "Vienna", "Accra", "Rome",
           "Kyiv", "Tehran", "Lisbon", "Lagos", "Istanbul", "Prague", "Dublin", "Shanghai", "Nairobi", "Bergen",
           "Chennai", "Munich", "Seville", "Warsaw"]
_PERSON_TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, {a} {job} based in {city}.",
    "{name} ({age}) works as {a} {job} in {city}.",
    "Our new colleague {name} is {age} years old and works as {a} {job} in {city}.",
    "In {city}, {name} has been {a} {job} for years and just turned {age}.",
    "{name}, {a} {job} aged {age}, lives in {city}.",
    "At {age}, {name} moved to {city} to work as {a} {job}.",
    "Say hello to {name} from {city}: {age} years old and {a} {job} by trade.",
    "The {job} {name} is {age} and calls {city} home.",
    "{name} lives in {city}, is {age}, and works as {a} {job}.",
]


def make_person_pair(rng: random.Random) -> tuple[str, str]:
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    job, city, age = rng.choice(_JOBS), rng.choice(_CITIES), rng.randint(19, 75)
    text = rng.choice(_PERSON_TEMPLATES).format(name=name, age=age, job=job, city=city, a=_article(job))
    return text, json.dumps({"name": name, "age": age, "job": job, "city": city})


# --- pirate: a plain sentence -> the same sentence in pirate speak ----------------------------------------------

_GREETINGS = ["", "", "Hello, my friend! ", "Yes, ", "Hello! ", "Listen, my friends: "]
_SUBJECTS = [("I", "am"), ("We", "are"), ("You", "are"), ("My brother", "is"), ("The captain", "is"),
             ("Your friend", "is"), ("Our cook", "is"), ("The old sailor", "is"), ("My friends", "are"),
             ("The crew", "is")]
_ACTIONS = ["looking for", "going to", "thinking about", "talking about", "waiting for", "cleaning", "searching for",
            "singing about", "dreaming of", "counting", "painting", "guarding"]
_OBJECTS = ["the treasure", "my money", "the ship", "your map", "the island", "the old harbor", "some fresh fish",
            "the stars", "a new hat", "the gold coins", "the storm", "your boots", "the parrot", "the anchor"]
_TIMES = ["", "today", "this morning", "tonight", "right now", "all day", "again", "before dinner"]
_PIRATE_WORDS = {"hello": "ahoy", "yes": "aye", "friend": "matey", "friends": "hearties", "my": "me", "you": "ye",
                 "your": "yer", "is": "be", "are": "be", "am": "be", "the": "th'", "money": "doubloons",
                 "to": "t'", "of": "o'", "for": "fer", "and": "an'", "some": "some o'", "old": "ol'"}


def pirate_word(word: str) -> str:
    """One word in pirate speak: a fixed lexicon, and "-ing" becomes "-in'"."""
    core = word.rstrip(",.!:?")
    tail = word[len(core):]
    lower = core.lower()
    if lower in _PIRATE_WORDS:
        new = _PIRATE_WORDS[lower]
        new = new[0].upper() + new[1:] if core[0].isupper() else new
    elif lower.endswith("ing") and len(lower) > 5:
        new = core[:-1] + "'"
    else:
        new = core
    return new + tail


def to_pirate(sentence: str) -> str:
    body = " ".join(pirate_word(w) for w in sentence.split())
    return "Arr! " + body[:-1] + "!" if body.endswith(".") else "Arr! " + body


def make_pirate_pair(rng: random.Random) -> tuple[str, str]:
    subject, verb = rng.choice(_SUBJECTS)
    time = rng.choice(_TIMES)
    greeting = rng.choice(_GREETINGS)
    if greeting.startswith("Yes") and subject != "I":  # "Yes, the captain is ..."
        subject = subject[0].lower() + subject[1:]
    sentence = f"{greeting}{subject} {verb} {rng.choice(_ACTIONS)} {rng.choice(_OBJECTS)}{' ' + time if time else ''}."
    return sentence, to_pirate(sentence)


# --- e2e_restaurant: an attribute record -> a fluent description ------------------------------------------------

_RESTAURANTS = ["The Eagle", "Blue Spice", "The Golden Curry", "Zizzi", "Alimentum", "Aromi", "Browns Cambridge",
                "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada",
                "Taste of Cambridge", "The Cricketers", "The Mill", "The Olive Grove", "The Phoenix", "The Plough",
                "The Punter", "The Rice Boat", "The Twenty Two", "The Vaults", "The Waterman", "Wildwood", "Clowns",
                "Bibimbap House", "The Wrestlers"]
_NEAR = ["Burger King", "Café Rouge", "The Portland Arms", "Crowne Plaza Hotel", "All Bar One", "Raja Indian Cuisine",
         "Café Sicilia", "Ranch", "Yippee Noodle Bar", "Avalon", "The Bakers", "Express by Holiday Inn",
         "The Sorrento", "Rainbow Vegetarian Café", "Clare Hall", "The Six Bells"]
_VALUES = {"eatType": ["coffee shop", "pub", "restaurant"],
           "food": ["French", "Italian", "Chinese", "Indian", "Japanese", "English", "Fast food"],
           "priceRange": ["cheap", "moderate", "high"],
           "customer rating": ["low", "average", "high"],
           "area": ["riverside", "city centre"],
           "familyFriendly": ["yes", "no"],
           "near": _NEAR}
_ORDER = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]


def format_record(record: dict[str, str]) -> str:
    return ", ".join(f"{key}[{record[key]}]" for key in _ORDER if key in record)


def describe_restaurant(record: dict[str, str], rng: random.Random) -> str:
    """A one- or two-sentence description that mentions every attribute, in one of a few phrasings."""
    adjectives = (["family-friendly"] if record.get("familyFriendly") == "yes" else [])
    if "food" in record:
        adjectives.append("fast food" if record["food"] == "Fast food" else record["food"])
    noun_phrase = " ".join(adjectives + [record.get("eatType", "place")])
    places = []
    if "area" in record:
        places.append("in the city centre" if record["area"] == "city centre" else "by the riverside")
    if "near" in record:
        places.append(f"near {record['near']}")
    extras = []
    if "priceRange" in record:
        extras.append(f"{record['priceRange']} prices")
    if "customer rating" in record:
        rating = record["customer rating"]
        extras.append(f"{_article(rating)} {rating} customer rating")
    name = record["name"]
    if rng.random() < 0.5 or not places:
        first = f"{name} is {_article(noun_phrase)} {noun_phrase}{' ' + ' '.join(places) if places else ''}"
    else:
        first = f"Located {' '.join(places)}, {name} is {_article(noun_phrase)} {noun_phrase}"
    if not extras and record.get("familyFriendly") != "no":
        return first + "."
    if rng.random() < 0.5 and extras:
        text = f"{first} with {' and '.join(extras)}."
        if record.get("familyFriendly") == "no":
            text += " It is not family-friendly."
        return text
    rest = f"It has {' and '.join(extras)}" if extras else "It"
    if record.get("familyFriendly") == "no":
        rest += " but is not family-friendly" if extras else " is not family-friendly"
    return f"{first}. {rest}."


def make_restaurant_pair(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(_ORDER[1:], rng.randint(3, 5))
    record = {"name": rng.choice(_RESTAURANTS)} | {key: rng.choice(_VALUES[key]) for key in keys}
    return format_record(record), describe_restaurant(record, rng)


TASKS = {task.name: task for task in [
    DemoTask("json_extract", "format", make_person_pair,
             instruction='Extract the person\'s name, age, job and city from the text. Reply with only a JSON object '
                         'with exactly the keys "name", "age", "job" and "city".\n\nText: ',
             metric="format_rate", init_text="Extract the person's name, age, job and city from the text.",
             json_keys=("name", "age", "job", "city")),
    DemoTask("pirate", "style", make_pirate_pair,
             instruction="Rewrite the sentence the way a pirate talks. Reply with only the rewritten sentence."
                         "\n\nSentence: ",
             metric="rougeL", init_text="Rewrite the sentence the way a pirate talks."),
    DemoTask("e2e_restaurant", "table-to-text", make_restaurant_pair,
             instruction="Write a short, fluent description of the restaurant that mentions every attribute below. "
                         "Reply with only the description.\n\nAttributes: ",
             metric="rougeL",
             init_text="Write a short, fluent description of the restaurant that mentions every attribute below."),
]}


def chat_example(user: str, answer: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def generate(task: DemoTask, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out test examples; no test input also appears in training."""
    rng = random.Random(f"{task.name}-{seed}")
    pairs: dict[str, str] = {}
    while len(pairs) < task.num_train + task.num_test:
        user, answer = task.make_pair(rng)
        pairs.setdefault(user, answer)
    items = list(pairs.items())
    return ([chat_example(u, a) for u, a in items[:task.num_train]],
            [chat_example(u, a) for u, a in items[task.num_train:]])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_datasets(names: list[str]) -> None:
    for name in names:
        task = TASKS[name]
        train, test = generate(task)
        write_jsonl(task.directory / "train.jsonl", train)
        write_jsonl(task.directory / "test.jsonl", test)
        print(f"{name}: {len(train)} train, {len(test)} test examples in {task.directory}")


def display_path(path: Path) -> str:
    """Relative to the working directory when inside it, so commands and training logs read the same anywhere."""
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)


def _data_args(task: DemoTask) -> list[str]:
    return ["--data", display_path(task.directory / "train.jsonl"),
            "--eval-data", display_path(task.directory / "test.jsonl")]


def train_command(task: DemoTask) -> list[str]:
    """The `prefix-serve train` arguments that make this demo prefix."""
    return ["train", *_data_args(task), "--out", display_path(task.directory), "--init-text", task.init_text,
            *task.prefix_args, *task.budget]


def full_finetune_command(task: DemoTask, out: str) -> list[str]:
    """The baseline: every weight trained on the same batches, for the same steps."""
    return ["train", *_data_args(task), "--out", out, "--full-finetune", *task.budget]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of: " + ", ".join(TASKS))
    parser.add_argument("--train", action="store_true", help="also train each prefix with `prefix-serve train`")
    parser.add_argument("--full-finetune-out", default=None, metavar="DIR",
                        help="also train the full fine-tune baselines, into DIR/<task> (about 540 MB each)")
    args = parser.parse_args(argv)
    names = [n for n in args.tasks.split(",") if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    write_datasets(names)
    commands = [train_command(TASKS[name]) for name in names] if args.train else []
    if args.full_finetune_out:
        commands += [full_finetune_command(TASKS[name], str(Path(args.full_finetune_out) / name)) for name in names]
    for command in commands:
        print("prefix-serve " + " ".join(shlex.quote(a) for a in command), flush=True)
        if _train_main(command) != 0:
            return 1
    return 0


def _train_main(command: list[str]) -> int:
    """Run one `prefix-serve train` command line in this process."""
    from engine.training import train

    parser = argparse.ArgumentParser(prog="prefix-serve")
    train.add_parser(parser.add_subparsers())
    args = parser.parse_args(command)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
