"""Tests for the synthetic training dialogues (training/dialogues.py, training/entities.py)."""

import json
import re

from gateway.tool_calls import parse_tool_calls
from mimo.chat_template import ChatTemplate
from training import entities
from training.dialogues import chat_dialogues, heldout_tool_prompts, rendered_chat_texts, tool_dialogues

TEMPLATE = ChatTemplate.default()


def heldout_values() -> list[str]:
    pools = [
        [city for city, _ in entities.CITIES.heldout],
        [timezone for _, timezone in entities.CITIES.heldout],
        entities.STOCKS.heldout,
        entities.CURRENCIES.heldout,
        entities.PEOPLE.heldout,
        entities.EVENT_TITLES.heldout,
        [subject for subject, _ in entities.EMAIL_TOPICS.heldout],
        entities.REMINDERS.heldout,
        entities.PHRASES.heldout,
        entities.LANGUAGES.heldout,
        [name for name, _ in entities.doc_entries().heldout],
    ]
    return [value for pool in pools for value in pool]


def test_heldout_entities_never_appear_in_training_text() -> None:
    """Catches held-out values leaking into training (e.g. a held-out city as a capital-city answer)."""
    text = "\n".join(rendered_chat_texts(TEMPLATE, 2000, seed=0))
    any_value = "|".join(re.escape(value) for value in heldout_values())
    assert re.findall(rf"(?<![\w.])(?:{any_value})(?!\w)", text) == []
    assert re.search(r"2025-1[12]-", text) is None  # held-out months


def test_heldout_prompts_offer_the_expected_tool() -> None:
    """Catches evaluation prompts whose right answer is not among the offered tools."""
    for messages, tools, expected in heldout_tool_prompts(200, seed=3):
        assert messages[-1]["role"] == "user"
        assert expected in [tool["function"]["name"] for tool in tools]
        assert 1 <= len(tools) <= 3


def test_generation_is_deterministic() -> None:
    """Catches hidden randomness (set order, global random) that would make training data irreproducible."""
    assert tool_dialogues(50, seed=5) == tool_dialogues(50, seed=5)
    assert chat_dialogues(50, seed=5) == chat_dialogues(50, seed=5)
    assert rendered_chat_texts(TEMPLATE, 30, seed=9) == rendered_chat_texts(TEMPLATE, 30, seed=9)


def test_thinking_off_turns_match_the_inference_prompt() -> None:
    """Catches training text for thinking-off turns differing from the prompt the model is served with."""
    for dialogue in tool_dialogues(40, seed=2) + chat_dialogues(40, seed=2):
        text = TEMPLATE.render(dialogue.messages, dialogue.tools, add_generation_prompt=False)
        turns = text.split("<|im_start|>assistant\n")[1:]
        assert turns
        for turn in turns:
            assert turn.startswith("<think>\n\n</think>\n\n") != dialogue.thinking
            assert turn.startswith("<think>\n")


def test_rendered_tool_calls_parse_back_to_the_dialogue_arguments() -> None:
    """Catches drift between the template's call format and the gateway parser (typed values included)."""
    for dialogue in tool_dialogues(60, seed=4):
        for message in dialogue.messages:
            if message["role"] != "assistant" or "tool_calls" not in message:
                continue
            text = TEMPLATE.render([message], add_generation_prompt=False)
            body = text.removeprefix("<|im_start|>assistant\n").removesuffix("<|im_end|>\n")
            body = body.split("</think>\n\n", 1)[1]
            parsed = parse_tool_calls(body, dialogue.tools)
            assert parsed.content == message["content"]
            expected = [
                (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
            ]
            assert [(c.name, json.loads(c.arguments_json)) for c in parsed.calls] == expected
