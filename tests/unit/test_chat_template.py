"""Exact prompt strings from the shipped chat template (mimo/chat_template.jinja, mimo/chat_template.py)."""

import pytest

from mimo.chat_template import ChatTemplate

TEMPLATE = ChatTemplate.default()

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS_TURN = (
    "<|im_start|>system\n"
    "Be brief.\n\n"
    "# Tools\nYou may call these functions:\n<tools>\n"
    '{"name": "get_weather", "description": "Weather now.", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}, "required": ["city"]}}\n'
    "</tools>\nTo call a function, reply with:\n<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n"
    "</parameter>\n</function>\n</tool_call><|im_end|>\n"
)


def test_generation_prompt_closes_an_empty_think_block_when_thinking_is_off() -> None:
    """Catches thinking-off prompts without the empty think block (the model would start reasoning)."""
    messages = [{"role": "user", "content": "Hi"}]
    off = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert TEMPLATE.render(messages) == off
    assert TEMPLATE.render(messages, enable_thinking=False) == off
    assert (
        TEMPLATE.render(messages, enable_thinking=True)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert TEMPLATE.render(messages, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_reasoning_of_every_earlier_assistant_turn_is_rendered_back() -> None:
    """Catches Qwen3-style dropping of earlier reasoning, which breaks MiMo's multi-turn chain of thought."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "\nAdd them.\n"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6.", "reasoning": "Add again."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome.", "reasoning_content": ""},
        {"role": "assistant", "content": "Bye.", "reasoning_content": None},
    ]
    assert TEMPLATE.render(messages, enable_thinking=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd again.\n</think>\n\n6.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nWelcome.<|im_end|>\n"
        "<|im_start|>assistant\nBye.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tool_calls_and_grouped_tool_results() -> None:
    """Catches tool results split into one user turn each, untyped values, or the system prompt lost."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Oslo?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Call it twice.",
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Bergen", "days": 2, "hourly": False},
                    }
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": '{"t": 3}'},
        {"role": "tool", "content": '{"t": 5}'},
        {"role": "assistant", "content": "3 and 5.", "reasoning_content": ""},
    ]
    assert TEMPLATE.render(messages, [WEATHER_TOOL], add_generation_prompt=False) == (
        TOOLS_TURN + "<|im_start|>user\nWeather in\nOslo?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nCall it twice.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nBergen\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n<parameter=hourly>\nfalse\n</parameter>\n</function>\n</tool_call>"
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"t": 3}\n</tool_response>\n'
        '<tool_response>\n{"t": 5}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n\n</think>\n\n3 and 5.<|im_end|>\n"
    )


def test_content_before_a_tool_call_is_separated_by_a_newline() -> None:
    """Catches content glued to <tool_call> (the parser and the training data expect one newline)."""
    messages = [
        {"role": "user", "content": "Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
        },
    ]
    assert TEMPLATE.render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nOslo?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n<tool_call>\n<function=f>\n</function>\n</tool_call><|im_end|>\n"
    )


def test_tools_without_a_system_message_get_their_own_system_turn() -> None:
    """Catches the first user message being swallowed as if it were the system message."""
    rendered = TEMPLATE.render(
        [{"role": "user", "content": "Hi"}], [WEATHER_TOOL], add_generation_prompt=False
    )
    assert rendered == TOOLS_TURN.replace("Be brief.\n\n", "") + "<|im_start|>user\nHi<|im_end|>\n"


def test_invalid_json_arguments_raise_a_clear_error() -> None:
    """Catches a bad client request crashing deep inside Jinja instead of a ValueError naming the call."""
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(ValueError, match="'f'"):
        TEMPLATE.render(messages)
