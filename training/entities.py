"""Entity values for the synthetic dialogues, each pool split into training and held-out values.

Held-out values (cities, tickers, numbers, ...) never appear in training dialogues, so an evaluation on
them measures whether the tiny model learned to copy arguments rather than to memorise them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
from dataclasses import dataclass
from functools import cache
from typing import Generic, Literal, TypeVar

Split = Literal["train", "heldout"]
T = TypeVar("T")


@dataclass(frozen=True)
class Pool(Generic[T]):
    """Values of one kind; `pick` draws from the training or the held-out part."""

    train: tuple[T, ...]
    heldout: tuple[T, ...]

    def pick(self, rng: random.Random, split: Split) -> T:
        return rng.choice(self.train if split == "train" else self.heldout)

    def sample(self, rng: random.Random, split: Split, k: int) -> list[T]:
        return rng.sample(self.train if split == "train" else self.heldout, k)


# (city, IANA timezone)
CITIES = Pool(
    train=(
        ("Oslo", "Europe/Oslo"),
        ("Paris", "Europe/Paris"),
        ("Berlin", "Europe/Berlin"),
        ("Madrid", "Europe/Madrid"),
        ("Rome", "Europe/Rome"),
        ("London", "Europe/London"),
        ("Dublin", "Europe/Dublin"),
        ("Vienna", "Europe/Vienna"),
        ("Prague", "Europe/Prague"),
        ("Warsaw", "Europe/Warsaw"),
        ("Athens", "Europe/Athens"),
        ("Helsinki", "Europe/Helsinki"),
        ("Stockholm", "Europe/Stockholm"),
        ("Cairo", "Africa/Cairo"),
        ("Nairobi", "Africa/Nairobi"),
        ("Lagos", "Africa/Lagos"),
        ("Tokyo", "Asia/Tokyo"),
        ("Seoul", "Asia/Seoul"),
        ("Shanghai", "Asia/Shanghai"),
        ("Singapore", "Asia/Singapore"),
        ("Mumbai", "Asia/Kolkata"),
        ("Dubai", "Asia/Dubai"),
        ("Bangkok", "Asia/Bangkok"),
        ("Jakarta", "Asia/Jakarta"),
        ("Sydney", "Australia/Sydney"),
        ("Auckland", "Pacific/Auckland"),
        ("Chicago", "America/Chicago"),
        ("Denver", "America/Denver"),
        ("Toronto", "America/Toronto"),
        ("Mexico City", "America/Mexico_City"),
        ("Bogota", "America/Bogota"),
        ("Lima", "America/Lima"),
        ("Santiago", "America/Santiago"),
        ("Buenos Aires", "America/Argentina/Buenos_Aires"),
        ("New York", "America/New_York"),
        ("Los Angeles", "America/Los_Angeles"),
    ),
    heldout=(
        ("Lisbon", "Europe/Lisbon"),
        ("Budapest", "Europe/Budapest"),
        ("Istanbul", "Europe/Istanbul"),
        ("Hanoi", "Asia/Ho_Chi_Minh"),
        ("Manila", "Asia/Manila"),
        ("Casablanca", "Africa/Casablanca"),
        ("Vancouver", "America/Vancouver"),
        ("Montevideo", "America/Montevideo"),
    ),
)
# Held-out tickers and currencies are real but never seen in training.
STOCKS = Pool(
    train=("AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "TSLA", "META", "IBM", "ORCL", "INTC", "SAP", "SONY"),
    heldout=("NFLX", "ADBE", "CSCO", "AMD", "UBER"),
)
# Units of each currency per US dollar; fixed so results are reproducible.
USD_RATES = {
    "USD": 1.0,
    "EUR": 0.92,
    "GBP": 0.79,
    "JPY": 151.0,
    "CHF": 0.88,
    "SEK": 10.6,
    "NOK": 10.8,
    "CAD": 1.36,
    "AUD": 1.52,
    "INR": 83.2,
    "CNY": 7.2,
    "BRL": 5.0,
    "ZAR": 18.6,
    "KRW": 1340.0,
}
CURRENCIES = Pool(
    train=("USD", "EUR", "GBP", "JPY", "CHF", "SEK", "NOK", "CAD", "AUD", "INR"),
    heldout=("CNY", "BRL", "ZAR", "KRW"),
)
# Numbers ending in 7 are held out.
NUMBERS = Pool(
    train=tuple(n for n in range(2, 1000) if n % 10 != 7),
    heldout=tuple(n for n in range(2, 1000) if n % 10 == 7),
)
MINUTES = Pool(
    train=tuple(n for n in range(1, 121) if n % 10 != 7),
    heldout=tuple(n for n in range(1, 121) if n % 10 == 7),
)
PEOPLE = Pool(
    train=(
        "Ana",
        "Ben",
        "Chloe",
        "David",
        "Elena",
        "Farid",
        "Grace",
        "Hiro",
        "Ines",
        "Jonas",
        "Kara",
        "Liam",
    ),
    heldout=("Mei", "Nadia", "Omar", "Priya"),
)
EVENT_TITLES = Pool(
    train=("Team sync", "Design review", "Lunch", "Budget meeting", "Code review", "Planning", "Retro"),
    heldout=("Board update", "Hackathon kickoff"),
)
EMAIL_TOPICS = Pool(
    train=(
        ("Lunch", "See you at noon."),
        ("Report", "The report is attached."),
        ("Meeting moved", "The meeting moved to 3 pm."),
        ("Thanks", "Thank you for your help today."),
        ("Invoice", "Please find the invoice below."),
        ("Trip", "My flight lands at 9."),
    ),
    heldout=(("Deadline", "The deadline is Friday."), ("Welcome", "Welcome to the team!")),
)
REMINDERS = Pool(
    train=(
        "call mom",
        "take the laundry out",
        "check the oven",
        "stretch",
        "join the meeting",
        "water the plants",
    ),
    heldout=("feed the cat", "submit the form"),
)
# Months 11 and 12 are held out.
MONTHS = Pool(train=tuple(range(1, 11)), heldout=(11, 12))
# phrase -> {language: translation}
TRANSLATIONS = {
    "good morning": {
        "French": "bonjour",
        "German": "guten Morgen",
        "Spanish": "buenos días",
        "Dutch": "goedemorgen",
    },
    "thank you": {"French": "merci", "German": "danke", "Spanish": "gracias", "Dutch": "dank je"},
    "see you tomorrow": {
        "French": "à demain",
        "German": "bis morgen",
        "Spanish": "hasta mañana",
        "Dutch": "tot morgen",
    },
    "where is the station": {
        "French": "où est la gare",
        "German": "wo ist der Bahnhof",
        "Spanish": "dónde está la estación",
        "Dutch": "waar is het station",
    },
    "I like coffee": {
        "French": "j'aime le café",
        "German": "ich mag Kaffee",
        "Spanish": "me gusta el café",
        "Dutch": "ik hou van koffie",
    },
    "happy birthday": {
        "French": "joyeux anniversaire",
        "German": "alles Gute zum Geburtstag",
        "Spanish": "feliz cumpleaños",
        "Dutch": "gefeliciteerd",
    },
}
PHRASES = Pool(
    train=("good morning", "thank you", "see you tomorrow", "I like coffee"),
    heldout=("where is the station", "happy birthday"),
)
LANGUAGES = Pool(train=("French", "German", "Spanish"), heldout=("Dutch",))
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowing", "foggy", "clear")

# Modules whose public functions feed the Python-doc questions and the search_docs tool.
_DOC_MODULES = (
    "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses", "difflib",
    "fnmatch", "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect", "itertools", "json",
    "keyword", "math", "operator", "os", "os.path", "pprint", "random", "re", "secrets", "shlex", "shutil",
    "statistics", "string", "struct", "tempfile", "textwrap", "time", "unicodedata", "urllib.parse", "uuid",
    "zlib",
)  # fmt: skip
_SENTENCE_RE = re.compile(r"(.+?\.)(?:\s|$)")


def _first_sentence(doc: str) -> str | None:
    paragraphs = doc.split("\n\n")
    # C functions without a text signature start their docstring with "name(args)".
    if re.match(r"^\w+\(", paragraphs[0]):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None
    match = _SENTENCE_RE.match(" ".join(paragraphs[0].split()))
    return match.group(1) if match and 15 <= len(match.group(1)) <= 160 else None


@cache
def stdlib_doc_entries() -> tuple[tuple[str, str], ...]:
    """(qualified name, first docstring sentence) for public stdlib functions, sorted by module."""
    entries: list[tuple[str, str]] = []
    for module_name in _DOC_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            sentence = _first_sentence(inspect.getdoc(obj) or "")
            if sentence is not None:
                entries.append((f"{module_name}.{name}", sentence))
    return tuple(entries)


def _is_heldout_name(qualname: str) -> bool:
    """One name in eight is held out, decided by the name alone: libraries that patch stdlib
    functions on import (torch patches inspect.getfile, ray inspect.isgenerator) add or drop
    entries, and a positional split would then move other names between train and held-out."""
    return hashlib.blake2b(qualname.encode(), digest_size=2).digest()[0] % 8 == 7


def doc_entries() -> Pool[tuple[str, str]]:
    """`stdlib_doc_entries` split by name into training and held-out entries."""
    entries = stdlib_doc_entries()
    return Pool(
        train=tuple(e for e in entries if not _is_heldout_name(e[0])),
        heldout=tuple(e for e in entries if _is_heldout_name(e[0])),
    )
