"""The VADER sentiment lexicon as a few-shot text task with held-out shifts (no download).

The PyPI package ``vaderSentiment`` ships ``vader_lexicon.txt`` (MIT licence): about 7,500
English words, phrases, emoticons and slang, each with the mean and standard deviation of ten
human valence ratings on -4 (extremely negative) .. +4 (extremely positive), and the ten
ratings. :func:`load_lexicon` parses it; :func:`lexicon_splits` turns it into

- a **few-shot training set** of single *word* entries, binary polarity (``POSITIVE`` when
  the mean rating is >= ``margin``, ``NEGATIVE`` when <= ``-margin``; entries in between are
  dropped), ``train_per_class`` entries per class;
- **in-distribution** test entries: other words, the same form (bare entries);
- zero-shot **shifts** never seen in fine-tuning: the test words inside neutral sentence
  templates (``template``), inside negated templates with the label flipped (``negated``),
  and the entries that are not words at all (``emoticon``: emoticons and symbol/number slang
  such as ``:-)``, ``</3``, ``gr8``, ``h8``), all held out of training;
- :data:`UNRELATED`, sentences with no sentiment task in them, for measuring how far the
  fine-tuned encoder's sentence embeddings move (forgetting).

docs/methods.md ("The MiniLM demo task") gives the reasons for these choices.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["Entry", "lexicon_path", "load_lexicon", "is_word", "Splits", "lexicon_splits",
           "TEMPLATES", "NEGATED_TEMPLATES", "UNRELATED", "NEGATIVE", "POSITIVE", "SHIFTS"]

NEGATIVE, POSITIVE = 0, 1
SHIFTS = ("template", "negated", "emoticon")

#: Neutral frames that take a word of any part of speech.
TEMPLATES = (
    "The movie was {w}.",
    "One word sums up the trip: {w}.",
    "My first thought was {w}.",
    "The review just said \"{w}\".",
    "Honestly, the whole evening felt {w}.",
    "She described the meeting as {w}.",
)
#: Negated frames: the word's polarity is reversed, so its label flips.
NEGATED_TEMPLATES = (
    "The movie was not {w}.",
    "The trip was not {w} at all.",
    "My first thought was that it is not {w}.",
    "The review said it was never {w}.",
    "Honestly, the whole evening did not feel {w}.",
    "She did not describe the meeting as {w}.",
)

#: Sentences unrelated to the task (no sentiment words of note), written for this demo.
UNRELATED = (
    "The train to the city leaves at seven in the morning.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library is on the second floor of the old building.",
    "Please send the report to the finance department by Friday.",
    "A triangle has three sides and three angles.",
    "The museum opens at ten and closes at six.",
    "He put the keys on the kitchen table.",
    "The river flows north through the valley.",
    "Our office moved to a new address last year.",
    "The recipe calls for two cups of flour and one egg.",
    "Mount Everest is the highest mountain above sea level.",
    "She parked the car behind the post office.",
    "The meeting has been moved to Tuesday afternoon.",
    "Most laptops have a battery and a keyboard.",
    "The bus stops near the corner of the main street.",
    "Paris is the capital of France.",
    "The printer on the third floor needs more paper.",
    "Turn left at the second traffic light.",
    "The package was delivered to the front door.",
    "A week has seven days.",
    "The committee will publish its minutes next month.",
    "He is reading a book about the history of trains.",
    "The garden is watered every evening.",
    "The store sells bread, milk and vegetables.",
    "The new bridge connects the two parts of the town.",
    "Light travels faster than sound.",
    "The class starts after the lunch break.",
    "They painted the fence white last summer.",
    "The file is saved in the shared folder.",
    "The airport is about twenty kilometres from the centre.",
    "Cats and dogs are common household pets.",
    "The lecture covers the basics of linear algebra.",
    "The clock in the hall shows the wrong time.",
    "She wrote the phone number on a piece of paper.",
    "The team meets in the conference room on Mondays.",
    "The moon orbits the earth about once a month.",
    "The shelves hold old magazines and maps.",
    "He changed the password for the email account.",
    "The highway was built in the nineteen sixties.",
    "The farmer grows wheat and corn on the hill.",
)

_WORD = re.compile(r"[a-z]+(?:['\- ][a-z]+)*")


@dataclass(frozen=True)
class Entry:
    """One lexicon line: the token (word, phrase, emoticon or slang), the mean and standard
    deviation of its ten ratings, and the ratings."""

    token: str
    mean: float
    std: float
    ratings: Tuple[int, ...]


def lexicon_path() -> str:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
    try:
        import vaderSentiment
    except ImportError as e:
        raise ImportError("the MiniLM demo's data is the VADER lexicon of the PyPI package "
                          "'vaderSentiment': pip install vaderSentiment (or bash tools/setup.sh)") from e
    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vaderSentiment is installed but has no lexicon at {path}")
    return path


def _parse_ratings(text: str, where: str) -> Tuple[int, ...]:
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise ValueError(f"{where}: ratings {text!r} are not a [..] list")
    return tuple(int(v) for v in inner[1:-1].split(",") if v.strip())


def load_lexicon(path: Optional[str] = None) -> List[Entry]:
    """Parse the lexicon (``token<TAB>mean<TAB>std<TAB>[r1, ..., r10]`` per line, CRLF or LF
    line ends, blank lines skipped) in file order. Raises ValueError naming the line of any
    malformed one."""
    path = path or lexicon_path()
    entries = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            where = f"{path}:{n}"
            if len(fields) != 4:
                raise ValueError(f"{where}: expected 4 tab-separated fields, got {len(fields)}")
            try:
                mean, std = float(fields[1]), float(fields[2])
            except ValueError:
                raise ValueError(f"{where}: mean/std {fields[1]!r}, {fields[2]!r} are not numbers") from None
            entries.append(Entry(fields[0], mean, std, _parse_ratings(fields[3], where)))
    return entries


def is_word(token: str) -> bool:
    """A word or short phrase of lower-case letters (with ' - or space inside): not an
    emoticon and not symbol/number slang."""
    return _WORD.fullmatch(token) is not None


@dataclass
class Splits:
    """Texts and labels of each split (lists of equal length)."""

    train: Tuple[List[str], List[int]]
    test: Tuple[List[str], List[int]]
    transfer: Dict[str, Tuple[List[str], List[int]]]


def _polar(entries: Sequence[Entry], margin: float) -> List[Tuple[str, int]]:
    out = []
    for e in entries:
        if e.mean >= margin:
            out.append((e.token, POSITIVE))
        elif e.mean <= -margin:
            out.append((e.token, NEGATIVE))
    return out


def _balanced(items: List[Tuple[str, int]], per_class: Optional[int], rng: random.Random
              ) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """Shuffle and take ``per_class`` of each label (None: as many as the rarer label has);
    returns (taken, rest)."""
    by_label = {NEGATIVE: [], POSITIVE: []}
    for t in items:
        by_label[t[1]].append(t)
    for v in by_label.values():
        rng.shuffle(v)
    k = min(len(v) for v in by_label.values()) if per_class is None else per_class
    for lab, v in by_label.items():
        if len(v) < k:
            raise ValueError(f"only {len(v)} entries of label {lab}, {k} asked for")
    taken = [t for v in by_label.values() for t in v[:k]]
    rest = [t for v in by_label.values() for t in v[k:]]
    rng.shuffle(taken)
    return taken, rest


def _unzip(items: List[Tuple[str, int]]) -> Tuple[List[str], List[int]]:
    return [t for t, _ in items], [y for _, y in items]


def lexicon_splits(entries: Sequence[Entry], *, train_per_class: int = 128, test_per_class: int = 250,
                   emoticon_per_class: Optional[int] = None, margin: float = 1.0, seed: int = 0,
                   canonical=None) -> Splits:
    """The few-shot task of the module doc, balanced per class, disjoint splits.

    ``canonical(token) -> key`` merges entries a tokenizer cannot tell apart (e.g. the
    uncased ``:D`` and ``:d``): entries with the same key are kept once, or dropped when their
    labels disagree. ``emoticon_per_class=None`` takes as many as the rarer label has. Each
    template and negated sentence uses one of the frames, picked per test word by ``seed``."""
    rng = random.Random(seed)
    canonical = canonical or (lambda t: t)
    seen: Dict[object, Tuple[str, int]] = {}
    clash = set()
    for token, label in _polar(entries, margin):
        key = canonical(token)
        if key in seen and seen[key][1] != label:
            clash.add(key)
        seen.setdefault(key, (token, label))
    items = [v for k, v in seen.items() if k not in clash]
    words = [t for t in items if is_word(t[0])]
    others = [t for t in items if not is_word(t[0])]
    train, rest = _balanced(words, train_per_class, rng)
    test, _ = _balanced(rest, test_per_class, rng)
    emoticon, _ = _balanced(others, emoticon_per_class, rng)
    frames = [rng.randrange(len(TEMPLATES)) for _ in test]
    template = [(TEMPLATES[f].format(w=w), y) for (w, y), f in zip(test, frames)]
    negated = [(NEGATED_TEMPLATES[f].format(w=w), 1 - y) for (w, y), f in zip(test, frames)]
    return Splits(train=_unzip(train), test=_unzip(test),
                  transfer={"template": _unzip(template), "negated": _unzip(negated),
                            "emoticon": _unzip(emoticon)})
