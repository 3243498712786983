"""The tools of the synthetic dialogues: an OpenAI schema and a scenario generator for each.

A scenario is one user request with the call that answers it, the tool's result and the final answer
built from that result, so dialogues teach the model to copy arguments in and results out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from training.entities import (
    CITIES,
    CONDITIONS,
    CURRENCIES,
    EMAIL_TOPICS,
    EVENT_TITLES,
    LANGUAGES,
    MINUTES,
    MONTHS,
    NUMBERS,
    PEOPLE,
    PHRASES,
    REMINDERS,
    STOCKS,
    TRANSLATIONS,
    USD_RATES,
    Split,
    doc_entries,
)


@dataclass(frozen=True)
class Scenario:
    """One tool request: what the user says, the call that answers it, its result, the final answer."""

    request: str
    intent: str  # "the weather in Oslo": used in reasoning
    name: str
    arguments: dict[str, Any]
    result: dict[str, Any]
    answer: str


def _schema(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


# Parameter descriptions only where the name alone is ambiguous: every schema token costs context.
_STRING: dict[str, Any] = {"type": "string"}

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "get_weather": _schema(
        "get_weather",
        "Current weather in a city.",
        {"city": _STRING, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    "search_docs": _schema(
        "search_docs", "Search the Python docs.", {"query": _STRING, "limit": {"type": "integer"}}, ["query"]
    ),
    "calculator": _schema("calculator", "Evaluate arithmetic.", {"expression": _STRING}, ["expression"]),
    "get_time": _schema(
        "get_time",
        "Local time in a timezone.",
        {"timezone": {"type": "string", "description": "IANA name"}},
        ["timezone"],
    ),
    "convert_currency": _schema(
        "convert_currency",
        "Convert money.",
        {"amount": {"type": "number"}, "from": _STRING, "to": _STRING},
        ["amount", "from", "to"],
    ),
    "send_email": _schema(
        "send_email",
        "Send an email.",
        {"to": _STRING, "subject": _STRING, "body": _STRING},
        ["to", "subject", "body"],
    ),
    "create_event": _schema(
        "create_event",
        "Create a calendar event.",
        {
            "title": _STRING,
            "date": {"type": "string", "description": "YYYY-MM-DD"},
            "attendees": {"type": "array", "items": _STRING},
        },
        ["title", "date"],
    ),
    "lookup_stock": _schema("lookup_stock", "Latest stock price.", {"symbol": _STRING}, ["symbol"]),
    "translate": _schema(
        "translate",
        "Translate text.",
        {"text": _STRING, "target_language": _STRING},
        ["text", "target_language"],
    ),
    "set_reminder": _schema(
        "set_reminder",
        "Remind the user later.",
        {"minutes": {"type": "integer"}, "text": _STRING},
        ["minutes", "text"],
    ),
}


def _weather(rng: random.Random, split: Split) -> Scenario:
    city, _ = CITIES.pick(rng, split)
    celsius = rng.randint(-5, 32)
    unit = rng.choice([None, "celsius", "fahrenheit"])
    condition = rng.choice(CONDITIONS)
    if unit is None:
        asks = [
            "What's the weather in {c}?",
            "How is the weather in {c} right now?",
            "Is it cold in {c} today?",
        ]
        request = rng.choice(asks).format(c=city)
    else:
        asks = [
            "What's the weather in {c} in {u}?",
            "Weather for {c} please, in {u}.",
            "How warm is it in {c}? Use {u}.",
        ]
        request = rng.choice(asks).format(c=city, u=unit)
    temperature = celsius if unit != "fahrenheit" else round(celsius * 9 / 5 + 32)
    shown_unit = unit or "celsius"
    arguments: dict[str, Any] = {"city": city} if unit is None else {"city": city, "unit": unit}
    result = {"city": city, "temperature": temperature, "unit": shown_unit, "condition": condition}
    answer = f"It is {temperature} degrees {shown_unit.capitalize()} and {condition} in {city}."
    return Scenario(request, f"the weather in {city}", "get_weather", arguments, result, answer)


def _search_docs(rng: random.Random, split: Split) -> Scenario:
    qualname, sentence = doc_entries().pick(rng, split)
    limit = rng.choice([None, 1, 2, 3, 5])
    if limit is None:
        asks = ["Search the docs for {q}.", "Look up {q} in the Python docs.", "Find documentation on {q}."]
        request = rng.choice(asks).format(q=qualname)
        arguments: dict[str, Any] = {"query": qualname}
    else:
        request = rng.choice(
            ["Search the docs for {q}, max {n} results.", "Find {n} doc pages about {q}."]
        ).format(q=qualname, n=limit)
        arguments = {"query": qualname, "limit": limit}
    result = {"results": [{"title": qualname, "snippet": sentence}]}
    answer = f"The docs for `{qualname}` say: {sentence}"
    return Scenario(request, f"documentation on {qualname}", "search_docs", arguments, result, answer)


def _calculator(rng: random.Random, split: Split) -> Scenario:
    a, b = NUMBERS.pick(rng, split), NUMBERS.pick(rng, split)
    op = rng.choice(["+", "-", "*"])
    value = a + b if op == "+" else a - b if op == "-" else a * b
    expression = f"{a} {op} {b}"
    asks = ["Use the calculator to compute {e}.", "Calculate {e} for me.", "What is {e}? Use the calculator."]
    request = rng.choice(asks).format(e=expression)
    arguments = {"expression": expression}
    return Scenario(
        request,
        f"the value of {expression}",
        "calculator",
        arguments,
        {"result": value},
        f"{expression} = {value}.",
    )


def _get_time(rng: random.Random, split: Split) -> Scenario:
    city, timezone = CITIES.pick(rng, split)
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    request = rng.choice(
        ["What time is it in {c}?", "Tell me the local time in {c}.", "Current time in {c}?"]
    ).format(c=city)
    result = {"timezone": timezone, "time": clock}
    return Scenario(
        request,
        f"the time in {city}",
        "get_time",
        {"timezone": timezone},
        result,
        f"It is {clock} in {city}.",
    )


def _convert_currency(rng: random.Random, split: Split) -> Scenario:
    source, target = CURRENCIES.sample(rng, split, 2)
    amount: float = NUMBERS.pick(rng, split)
    if rng.random() < 0.3:
        amount += 0.5
    converted = round(amount / USD_RATES[source] * USD_RATES[target], 2)
    asks = ["Convert {a} {s} to {t}.", "How much is {a} {s} in {t}?", "What are {a} {s} worth in {t}?"]
    request = rng.choice(asks).format(a=amount, s=source, t=target)
    arguments = {"amount": amount, "from": source, "to": target}
    result = {"amount": converted, "currency": target}
    answer = f"{amount} {source} is {converted} {target}."
    return Scenario(request, f"{amount} {source} in {target}", "convert_currency", arguments, result, answer)


def _send_email(rng: random.Random, split: Split) -> Scenario:
    person = PEOPLE.pick(rng, split)
    address = f"{person.lower()}@example.com"
    subject, body = EMAIL_TOPICS.pick(rng, split)
    asks = [
        "Send an email to {a} with the subject '{s}' saying '{b}'",
        "Email {a}: subject '{s}', text '{b}'",
        "Please write to {a}. Subject: {s}. Body: {b}",
    ]
    request = rng.choice(asks).format(a=address, s=subject, b=body)
    arguments = {"to": address, "subject": subject, "body": body}
    result = {"status": "sent", "to": address}
    answer = f"Done: I sent the email '{subject}' to {address}."
    return Scenario(request, f"to email {address}", "send_email", arguments, result, answer)


def _create_event(rng: random.Random, split: Split) -> Scenario:
    title = EVENT_TITLES.pick(rng, split)
    date = f"2025-{MONTHS.pick(rng, split):02d}-{rng.randint(1, 28):02d}"
    attendees = PEOPLE.sample(rng, split, rng.randint(1, 3))
    asks = [
        "Create an event '{t}' on {d} with {p}.",
        "Schedule {t} for {d} and invite {p}.",
        "Add '{t}' on {d} with {p}.",
    ]
    request = rng.choice(asks).format(t=title, d=date, p=" and ".join(attendees))
    arguments = {"title": title, "date": date, "attendees": attendees}
    result = {"status": "created", "event_id": f"evt_{rng.randint(100, 999)}"}
    answer = f"I created '{title}' on {date} with {', '.join(attendees)}."
    return Scenario(request, f"an event '{title}' on {date}", "create_event", arguments, result, answer)


def _lookup_stock(rng: random.Random, split: Split) -> Scenario:
    symbol = STOCKS.pick(rng, split)
    price = round(rng.uniform(20, 900), 2)
    request = rng.choice(
        ["What's the stock price of {s}?", "How is {s} trading?", "Get me the price of {s}."]
    ).format(s=symbol)
    result = {"symbol": symbol, "price": price, "currency": "USD"}
    return Scenario(
        request,
        f"the price of {symbol}",
        "lookup_stock",
        {"symbol": symbol},
        result,
        f"{symbol} is at {price} USD.",
    )


def _translate(rng: random.Random, split: Split) -> Scenario:
    phrase, language = PHRASES.pick(rng, split), LANGUAGES.pick(rng, split)
    translation = TRANSLATIONS[phrase][language]
    asks = ["Translate '{p}' into {l}.", "How do you say '{p}' in {l}?", "Please translate '{p}' to {l}."]
    request = rng.choice(asks).format(p=phrase, l=language)
    arguments = {"text": phrase, "target_language": language}
    answer = f"In {language}, '{phrase}' is '{translation}'."
    return Scenario(
        request, f"'{phrase}' in {language}", "translate", arguments, {"translation": translation}, answer
    )


def _set_reminder(rng: random.Random, split: Split) -> Scenario:
    minutes, text = MINUTES.pick(rng, split), REMINDERS.pick(rng, split)
    asks = [
        "Remind me to {t} in {m} minutes.",
        "In {m} minutes, remind me to {t}.",
        "Set a reminder to {t} in {m} minutes.",
    ]
    request = rng.choice(asks).format(t=text, m=minutes)
    arguments = {"minutes": minutes, "text": text}
    answer = f"OK, I will remind you to {text} in {minutes} minutes."
    return Scenario(
        request, f"a reminder to {text}", "set_reminder", arguments, {"status": "scheduled"}, answer
    )


SCENARIOS: dict[str, Callable[[random.Random, Split], Scenario]] = {
    "get_weather": _weather,
    "search_docs": _search_docs,
    "calculator": _calculator,
    "get_time": _get_time,
    "convert_currency": _convert_currency,
    "send_email": _send_email,
    "create_event": _create_event,
    "lookup_stock": _lookup_stock,
    "translate": _translate,
    "set_reminder": _set_reminder,
}
