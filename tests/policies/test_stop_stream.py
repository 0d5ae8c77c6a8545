from __future__ import annotations

import pytest

from policies.stop_stream import StopStringStream


def _run(pieces: list[str], stops: list[str]) -> tuple[list[str], str]:
    stream = StopStringStream(stops)
    emitted = [stream.push(p) for p in pieces]
    return emitted, "".join(emitted) + stream.flush()


def test_text_without_stops_passes_through_piece_by_piece() -> None:
    emitted, total = _run(["Hello", " world", "!"], ["# Query:"])
    assert emitted == ["Hello", " world", "!"]
    assert total == "Hello world!"


def test_a_possible_stop_prefix_is_held_back_then_released() -> None:
    stream = StopStringStream(["# Query:"])
    assert stream.push("Answer # Qu") == "Answer "
    assert stream.push("ick note") == "# Quick note"


def test_a_stop_split_over_pieces_cuts_the_text_and_ends_the_stream() -> None:
    emitted, total = _run(["Done.\n# Q", "uery: next", " question"], ["# Query:"])
    assert total == "Done.\n"
    assert emitted[-1] == ""


def test_the_earliest_of_several_stops_wins() -> None:
    _, total = _run(["one STOP two END"], ["END", "STOP"])
    assert total == "one "


def test_held_back_text_is_flushed_when_generation_ends() -> None:
    _, total = _run(["ends with # Que"], ["# Query:"])
    assert total == "ends with # Que"


@pytest.mark.parametrize("split", range(1, 20))
def test_any_split_gives_the_same_text_as_cutting_the_whole(split: int) -> None:
    text = "An answer.\n# Query: more"
    _, total = _run([text[:split], text[split:]], ["# Query:"])
    assert total == text[: text.find("# Query:")]
