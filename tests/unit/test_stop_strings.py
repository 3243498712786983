"""StopStringMatcher: stops split across deltas, overlapping stops, held-back text and flushing."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.engine.stop_strings import StopStringMatcher


def _feed(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool]:
    """Pushes deltas until a stop; returns everything emitted (plus the flush if no stop) and the hit."""
    emitted = []
    for delta in deltas:
        text, stopped = matcher.push(delta)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True
    return "".join(emitted) + matcher.flush(), False


def _chars(text: str) -> list[str]:
    return list(text)


@pytest.mark.parametrize(
    ("stops", "text", "expected", "stopped"),
    [
        (["STOP"], "hello STOP world", "hello ", True),
        (["STOP"], "STOP at once", "", True),
        (["STOP"], "no stop here", "no stop here", False),
        (["STOP"], "ends with STO", "ends with STO", False),  # a partial stop at the end is flushed
        (["abc", "bcd"], "xabcd", "x", True),  # overlapping stops: the first to complete wins
        (["bcd", "abcde"], "xabcde", "xa", True),  # ... even when a longer one started earlier
        (["ab", "abc"], "zabc", "z", True),
        (["bc", "abc"], "zabc", "z", True),  # both complete together: the longer emits less
        (["aab"], "aaab", "a", True),  # the held suffix must restart inside itself
        (["\n\n"], "line\n\nnext", "line", True),
        (["😀x"], "a😀😀x", "a😀", True),  # non-ASCII characters
        ([], "anything STOP", "anything STOP", False),
    ],
)
@pytest.mark.parametrize("split", ["whole", "chars", "pairs"])
def test_stop_found_however_the_text_is_split(
    stops: list[str], text: str, expected: str, stopped: bool, split: str
) -> None:
    """Catches a stop string missed when split across token boundaries, partly emitted before it
    completes, the stop itself emitted, or overlapping stops resolved differently depending on how
    the text was split into deltas."""
    if split == "whole":
        deltas = [text]
    elif split == "chars":
        deltas = _chars(text)
    else:
        deltas = [text[i : i + 2] for i in range(0, len(text), 2)]
    assert _feed(StopStringMatcher(stops), deltas) == (expected, stopped)


def test_text_is_held_only_while_it_can_still_start_a_stop() -> None:
    """Catches over-eager holding (latency: text that cannot start a stop held back) and under-holding
    (a stop's prefix emitted before the stop completes)."""
    matcher = StopStringMatcher(["<end>", "##"])
    assert matcher.push("hello <e") == ("hello ", False)
    assert matcher.push("x") == ("<ex", False)  # "<ex" can no longer start "<end>"
    assert matcher.push("a#") == ("a", False)
    assert matcher.push("b") == ("#b", False)
    assert matcher.push("<en") == ("", False)
    assert matcher.push("d>tail") == ("", True)
    assert matcher.flush() == ""


def test_push_after_a_stop_emits_nothing() -> None:
    """Catches text after a stop leaking out if the engine pushes one more delta before finishing."""
    matcher = StopStringMatcher(["END"])
    assert matcher.push("aEN") == ("a", False)
    assert matcher.push("Dmore") == ("", True)
    assert matcher.is_stopped
    assert matcher.push("even more") == ("", True)


def test_flush_returns_held_text_once() -> None:
    """Catches held-back text lost at the end of the stream (or returned twice)."""
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("fin ST") == ("fin ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_empty_deltas_are_harmless() -> None:
    """Catches an empty delta (a token that detokenizes to nothing yet) dropping or re-emitting text."""
    matcher = StopStringMatcher(["xyz"])
    assert matcher.push("ab x") == ("ab ", False)
    assert matcher.push("") == ("", False)
    assert matcher.push("y") == ("", False)
    assert matcher.push("") == ("", False)
    assert matcher.push("z!") == ("", True)


def _reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Scans end positions in order: the first stop to end wins, the longest on a tie."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if text[:end].endswith(stop)]
        if ending:
            return text[: end - max(len(stop) for stop in ending)], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text("ab\n", min_size=1, max_size=4), max_size=3),
    text=st.text("ab\nc", max_size=16),
    cuts=st.lists(st.integers(0, 16), max_size=6),
)
def test_matches_reference_for_any_split(stops: list[str], text: str, cuts: list[int]) -> None:
    """Catches any split of the text (token boundaries anywhere) changing what is emitted."""
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert _feed(StopStringMatcher(stops), deltas) == _reference(stops, text)
