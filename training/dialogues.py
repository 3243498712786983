"""Synthetic chat data for the tiny model: tool use, thinking on and off, arithmetic, facts, Python docs.

Dialogues are OpenAI-style message lists (+ tools) drawn from a seeded `random.Random`. Thinking-off
assistant turns carry `reasoning_content == ""`, which the template renders as the empty think block
that thinking-off inference prompts end with, so training text and prompts agree token for token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mimo.chat_template import ChatTemplate
from mimo.tokenizer import Tokenizer
from training.entities import CITIES, CURRENCIES, PEOPLE, STOCKS, USD_RATES, Pool, Split, doc_entries
from training.tool_scenarios import SCENARIOS, TOOL_SCHEMAS, Scenario

Message = dict[str, Any]
T = TypeVar("T")

SYSTEM_PROMPTS = (
    "You are MiMo, a helpful assistant.",
    "You are MiMo, an AI assistant developed by Xiaomi. Answer briefly.",
    "You are a concise assistant.",
)
_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("India", "New Delhi"), ("China", "Beijing"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Mexico", "Mexico City"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Morocco", "Rabat"),
    ("Hungary", "Budapest"), ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
)  # fmt: skip
# (question, answer); every fifth is held out.
_FACTS = (
    ("How many days are in a week?", "A week has 7 days."),
    ("How many minutes are in an hour?", "An hour has 60 minutes."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What is the chemical symbol for water?", "The chemical formula of water is H2O."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("How many continents are there?", "There are 7 continents."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("What language is Python named after?", "Python is named after the comedy group Monty Python."),
    ("Who created Python?", "Python was created by Guido van Rossum."),
    ("How many bits are in a byte?", "A byte has 8 bits."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
)
_CALL_PREFACES = ("Let me check.", "I'll look that up.", "One moment.")


@dataclass(frozen=True)
class Dialogue:
    """One conversation: OpenAI-style messages, the tools offered (or None) and whether it thinks."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    thinking: bool


def _split_pool(items: tuple[T, ...], every: int, keep_out: Callable[[T], bool] = lambda _: False) -> Pool[T]:
    """Every `every`-th item is held out, and so is any item `keep_out` names."""
    is_heldout = [i % every == every - 1 or keep_out(x) for i, x in enumerate(items)]
    return Pool(
        train=tuple(x for x, held in zip(items, is_heldout, strict=True) if not held),
        heldout=tuple(x for x, held in zip(items, is_heldout, strict=True) if held),
    )


def _assistant(
    thinking: bool, reasoning: str, content: str = "", calls: list[Message] | None = None
) -> Message:
    message: Message = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning if thinking else "",
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _call(rng: random.Random, name: str, arguments: dict[str, Any]) -> Message:
    # OpenAI's shape: arguments as a JSON string (mimo.chat_template parses them for the template).
    function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {"id": f"call_{rng.randrange(16**8):08x}", "type": "function", "function": function}


def _tool_result(call: Message, result: dict[str, Any]) -> Message:
    return {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result, ensure_ascii=False)}


def _args_text(arguments: dict[str, Any]) -> str:
    parts = [
        f"{key} {value if isinstance(value, str) else json.dumps(value)}" for key, value in arguments.items()
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _offer(rng: random.Random, needed: list[str], exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """1-3 tool schemas, the needed ones among them, in random order."""
    others = [name for name in TOOL_SCHEMAS if name not in needed and name not in exclude]
    # Mostly one or two tools: every offered schema costs ~50 tokens of the tiny model's context.
    num_offered = max(len(set(needed)), 1, rng.choices((1, 2, 3), (0.45, 0.35, 0.2))[0])
    names = list(dict.fromkeys(needed)) + rng.sample(others, num_offered - len(set(needed)))
    rng.shuffle(names)
    return [TOOL_SCHEMAS[name] for name in names]


def _opening(rng: random.Random, request: str) -> list[Message]:
    system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    return [*system, {"role": "user", "content": request}]


def _single_call_turns(rng: random.Random, scenario: Scenario, thinking: bool) -> list[Message]:
    call = _call(rng, scenario.name, scenario.arguments)
    arguments = _args_text(scenario.arguments)
    reasoning = f"The user wants {scenario.intent}. I should call {scenario.name} with {arguments}."
    preface = rng.choice(_CALL_PREFACES) if rng.random() < 0.15 else ""
    return [
        _assistant(thinking, reasoning, preface, [call]),
        _tool_result(call, scenario.result),
        _assistant(thinking, f"The {scenario.name} result answers the question.", scenario.answer),
    ]


def _single(rng: random.Random, split: Split, thinking: bool) -> Dialogue:
    scenario = SCENARIOS[rng.choice(list(SCENARIOS))](rng, split)
    tools = _offer(rng, [scenario.name])
    messages = _opening(rng, scenario.request) + _single_call_turns(rng, scenario, thinking)
    if rng.random() < 0.15:  # a follow-up request: earlier reasoning stays in the history
        follow_up = SCENARIOS[rng.choice(tools)["function"]["name"]](rng, split)
        messages += [
            {"role": "user", "content": follow_up.request},
            *_single_call_turns(rng, follow_up, thinking),
        ]
    return Dialogue(messages, tools, thinking)


def _parallel(rng: random.Random, split: Split, thinking: bool) -> Dialogue:
    first, second = (SCENARIOS[name](rng, split) for name in rng.sample(list(SCENARIOS), 2))
    request = f"{first.request} Also, {second.request[0].lower()}{second.request[1:]}"
    calls = [_call(rng, s.name, s.arguments) for s in (first, second)]
    reasoning = (
        f"The user wants {first.intent} and {second.intent}. I should call {first.name} and {second.name}."
    )
    messages = [
        *_opening(rng, request),
        _assistant(thinking, reasoning, "", calls),
        _tool_result(calls[0], first.result),
        _tool_result(calls[1], second.result),
        _assistant(thinking, "Both results are in. I can answer now.", f"{first.answer} {second.answer}"),
    ]
    return Dialogue(messages, _offer(rng, [first.name, second.name]), thinking)


def _stock_in_currency(rng: random.Random, split: Split, thinking: bool) -> Dialogue:
    """Two dependent calls: the stock price feeds the currency conversion."""
    symbol = STOCKS.pick(rng, split)
    target = rng.choice(
        [c for c in (CURRENCIES.train if split == "train" else CURRENCIES.heldout) if c != "USD"]
    )
    price = round(rng.uniform(20, 900), 2)
    converted = round(price * USD_RATES[target], 2)
    lookup = _call(rng, "lookup_stock", {"symbol": symbol})
    convert = _call(rng, "convert_currency", {"amount": price, "from": "USD", "to": target})
    messages = _opening(
        rng,
        rng.choice(["What is {s} worth in {c}?", "Price of {s} in {c}, please."]).format(s=symbol, c=target),
    )
    messages += [
        _assistant(
            thinking,
            f"The user wants the price of {symbol} in {target}. First I call lookup_stock.",
            "",
            [lookup],
        ),
        _tool_result(lookup, {"symbol": symbol, "price": price, "currency": "USD"}),
        _assistant(thinking, f"{symbol} is at {price} USD. Now I convert it to {target}.", "", [convert]),
        _tool_result(convert, {"amount": converted, "currency": target}),
        _assistant(
            thinking, "I have both numbers.", f"{symbol} is at {price} USD, which is {converted} {target}."
        ),
    ]
    return Dialogue(messages, _offer(rng, ["lookup_stock", "convert_currency"]), thinking)


def _weather_email(rng: random.Random, split: Split, thinking: bool) -> Dialogue:
    """Two dependent calls: the weather report becomes the body of an email."""
    weather = SCENARIOS["get_weather"](rng, split)
    address = f"{PEOPLE.pick(rng, split).lower()}@example.com"
    city = weather.arguments["city"]
    email_args = {"to": address, "subject": f"Weather in {city}", "body": weather.answer}
    lookup, send = _call(rng, "get_weather", weather.arguments), _call(rng, "send_email", email_args)
    messages = _opening(rng, f"Check the weather in {city} and email it to {address}.")
    messages += [
        _assistant(thinking, f"First I get the weather in {city} with get_weather.", "", [lookup]),
        _tool_result(lookup, weather.result),
        _assistant(thinking, f"Now I send the report to {address} with send_email.", "", [send]),
        _tool_result(send, {"status": "sent", "to": address}),
        _assistant(
            thinking, "The email is sent.", f"I sent the weather in {city} to {address}: {weather.answer}"
        ),
    ]
    return Dialogue(messages, _offer(rng, ["get_weather", "send_email"]), thinking)


def _no_call(rng: random.Random, split: Split, thinking: bool) -> Dialogue:
    """Tools offered but not needed: the model must answer directly."""
    question, answer, reasoning = _fact(rng, split)
    messages = [*_opening(rng, question), _assistant(thinking, reasoning, answer)]
    return Dialogue(messages, _offer(rng, [], exclude=("search_docs",)), thinking)


def tool_dialogues(n: int, seed: int, split: Split = "train") -> list[Dialogue]:
    """`n` tool-use dialogues: single calls (some with a follow-up), parallel and dependent calls, no call."""
    rng = random.Random(seed)
    kinds = (_single, _parallel, _stock_in_currency, _weather_email, _no_call)
    weights = (0.68, 0.1, 0.06, 0.06, 0.1)
    return [rng.choices(kinds, weights)[0](rng, split, rng.random() < 0.5) for _ in range(n)]


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        value = a * b
        reasoning = f"{a} * {b} = {value}."
        if b >= 10:  # spell out the split of the second factor, a chain of thought worth learning
            tens, ones = b // 10 * 10, b % 10
            reasoning = f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones} = {value}."
        words = ["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}."]
    else:
        a, b = rng.randint(1, 200), rng.randint(1, 200)
        value = a + b if op == "+" else a - b
        reasoning = f"{a} {op} {b} = {value}."
        words = (
            ["What is {a} + {b}?", "Add {a} and {b}."]
            if op == "+"
            else ["What is {a} - {b}?", "Subtract {b} from {a}."]
        )
    return (
        rng.choice(words).format(a=a, b=b),
        rng.choice(["{e} = {v}.", "The answer is {v}."]).format(e=f"{a} {op} {b}", v=value),
        reasoning,
    )


def _fact(rng: random.Random, split: Split) -> tuple[str, str, str]:
    if rng.random() < 0.6:
        # Held-out tool cities (Hanoi, Lisbon, ...) must not reach training through capitals either.
        heldout_cities = {city for city, _ in CITIES.heldout}
        capitals = _split_pool(_CAPITALS, 6, keep_out=lambda pair: pair[1] in heldout_cities)
        country, city = capitals.pick(rng, split)
        question = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?"]).format(
            c=country
        )
        return question, f"The capital of {country} is {city}.", f"{city} is the capital of {country}."
    question, answer = _split_pool(_FACTS, 5).pick(rng, split)
    return question, answer, f"This is a basic fact. {answer}"


def _doc_question(rng: random.Random, split: Split) -> tuple[str, str, str]:
    qualname, sentence = doc_entries().pick(rng, split)
    module = qualname.rsplit(".", 1)[0]
    question = rng.choice(["What does `{q}` do?", "Explain `{q}` briefly.", "What is {q} for?"]).format(
        q=qualname
    )
    return (
        question,
        f"`{qualname}`: {sentence}",
        f"The question is about {qualname} from the {module} module.",
    )


def chat_dialogues(n: int, seed: int, split: Split = "train") -> list[Dialogue]:
    """`n` tool-free dialogues of 1-2 exchanges: arithmetic, facts and Python-doc questions."""
    rng = random.Random(seed)
    dialogues = []
    for _ in range(n):
        thinking = rng.random() < 0.5
        messages: list[Message] = []
        for turn in range(1 if rng.random() < 0.7 else 2):
            kind = rng.choices(("arithmetic", "fact", "doc"), (0.35, 0.3, 0.35))[0]
            if kind == "arithmetic":
                question, answer, reasoning = _arithmetic(rng)
            elif kind == "fact":
                question, answer, reasoning = _fact(rng, split)
            else:
                question, answer, reasoning = _doc_question(rng, split)
            messages += _opening(rng, question) if turn == 0 else [{"role": "user", "content": question}]
            messages.append(_assistant(thinking, reasoning, answer))
        dialogues.append(Dialogue(messages, None, thinking))
    return dialogues


def heldout_tool_prompts(n: int, seed: int) -> list[tuple[list[Message], list[dict[str, Any]], str]]:
    """`n` (messages, tools, expected tool name) built only from held-out entity values."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        scenario = SCENARIOS[rng.choice(list(SCENARIOS))](rng, "heldout")
        prompts.append((_opening(rng, scenario.request), _offer(rng, [scenario.name]), scenario.name))
    return prompts


def rendered_chat_texts(
    tokenizer_or_template: Tokenizer | ChatTemplate | str, n: int, seed: int, tool_fraction: float = 0.6
) -> list[str]:
    """`n` full training conversations rendered with the chat template (training split, thinking on/off)."""
    template = tokenizer_or_template
    if isinstance(template, Tokenizer):
        template = template.chat_template
    elif isinstance(template, str):
        template = ChatTemplate(template)
    num_tool = round(n * tool_fraction)
    dialogues = tool_dialogues(num_tool, seed, "train") + chat_dialogues(n - num_tool, seed + 1, "train")
    random.Random(seed).shuffle(dialogues)
    return [template.render(d.messages, d.tools, add_generation_prompt=False) for d in dialogues]
