"""Tests for the Qwen3-Coder XML tool-call parser (gateway/tool_calls.py)."""

import json

from gateway.tool_calls import ParsedToolCalls, ToolCall, parse_tool_calls

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "plan",
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "count": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "urgent": {"type": "boolean"},
                    "nothing": {"type": "null"},
                    "meta": {"type": "object"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "maybe": {"type": ["integer", "null"]},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}}}},
    },
]


def block(name: str, **params: str) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def test_arguments_are_typed_by_the_schema() -> None:
    """Catches values passed through as strings ("3", "true") instead of the schema's JSON types."""
    text = block(
        "plan",
        title="  Ship it ",
        count="3",
        ratio="0.25",
        urgent="True",
        nothing="null",
        meta='{"a": [1, 2]}',
        tags='["x", "y"]',
        maybe="null",
    )
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content == ""
    assert [call.name for call in parsed.calls] == ["plan"]
    assert json.loads(parsed.calls[0].arguments_json) == {
        "title": "  Ship it ",
        "count": 3,
        "ratio": 0.25,
        "urgent": True,
        "nothing": None,
        "meta": {"a": [1, 2]},
        "tags": ["x", "y"],
        "maybe": None,
    }


def test_string_values_keep_inner_newlines_and_lose_only_the_framing_ones() -> None:
    """Catches stripping all whitespace from strings (code and poems lose their layout)."""
    parsed = parse_tool_calls(block("plan", title="line 1\n\n  line 2\n"), TOOLS)
    assert json.loads(parsed.calls[0].arguments_json) == {"title": "line 1\n\n  line 2\n"}


def test_values_that_do_not_fit_their_type_fall_back_to_strings() -> None:
    """Catches a crash (or a dropped call) when the model writes a non-number for an integer."""
    text = block("plan", count="three", ratio="nan", meta="{not json", tags='{"a": 1}', maybe="4")
    parsed = parse_tool_calls(text, TOOLS)
    assert json.loads(parsed.calls[0].arguments_json) == {
        "count": "three",
        "ratio": "nan",
        "meta": "{not json",
        "tags": '{"a": 1}',
        "maybe": 4,
    }


def test_several_calls_with_content_before_them() -> None:
    """Catches only the first call being returned, or the separator newlines leaking into content."""
    text = "Let me check.\n" + block("get_weather", city="Oslo") + "\n" + block("get_weather", city="Lima")
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed == ParsedToolCalls(
        "Let me check.",
        [ToolCall("get_weather", '{"city": "Oslo"}'), ToolCall("get_weather", '{"city": "Lima"}')],
    )


def test_a_call_to_an_undefined_function_stays_content() -> None:
    """Catches a `tool_calls` entry naming a function the request did not define (a client cannot
    dispatch it); the text is kept as content, never dropped. Without tools (None) any name parses."""
    text = block("launch", count="5")
    assert parse_tool_calls(text, TOOLS) == ParsedToolCalls(text, [])
    mixed = parse_tool_calls(text + "\n" + block("get_weather", city="Oslo"), TOOLS)
    assert mixed.calls == [ToolCall("get_weather", '{"city": "Oslo"}')]
    assert mixed.content == text
    assert parse_tool_calls(text, None).calls == [ToolCall("launch", '{"count": "5"}')]


def test_call_without_parameters() -> None:
    """Catches a function with no parameters being treated as malformed."""
    now = {"type": "function", "function": {"name": "now"}}
    parsed = parse_tool_calls("<tool_call>\n<function=now>\n</function>\n</tool_call>", [*TOOLS, now])
    assert parsed == ParsedToolCalls("", [ToolCall("now", "{}")])


def test_text_without_calls_is_returned_unchanged() -> None:
    """Catches content being stripped or altered when there is no tool call at all."""
    assert parse_tool_calls("  Hello\n", TOOLS) == ParsedToolCalls("  Hello\n", [])


def test_malformed_blocks_stay_in_content_and_never_raise() -> None:
    """Catches exceptions or silently lost text on truncated or garbled model output."""
    unclosed = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
    no_function = "<tool_call>\nhello\n</tool_call>"
    unclosed_parameter = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</function>\n</tool_call>"
    )
    junk_between = block("get_weather", city="Oslo").replace("<parameter=", "junk<parameter=")
    for text in (unclosed, no_function, unclosed_parameter, junk_between, "<tool_call>", "</tool_call>"):
        assert parse_tool_calls(text, TOOLS) == ParsedToolCalls(text, [])


def test_unclosed_block_does_not_swallow_the_next_good_one() -> None:
    """Catches a dangling <tool_call> making the parser lose a later well-formed call."""
    text = "<tool_call>\n<function=x>\n" + block("get_weather", city="Oslo")
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed == ParsedToolCalls(
        "<tool_call>\n<function=x>", [ToolCall("get_weather", '{"city": "Oslo"}')]
    )


def test_non_ascii_arguments_are_kept_as_text() -> None:
    """Catches arguments_json escaping non-ASCII (clients then see \\u sequences in their logs)."""
    parsed = parse_tool_calls(block("get_weather", city="Zürich"), TOOLS)
    assert parsed.calls == [ToolCall("get_weather", '{"city": "Zürich"}')]
