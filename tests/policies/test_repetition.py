from policies.repetition import loops, repeated_line, repeated_phrase


def test_a_line_repeated_three_times_loops() -> None:
    answer = "Here is the letter.\n[name]\n[Name]\n  [name]  \nThanks"
    assert repeated_line(answer) == "[name]"
    assert loops(answer)


def test_two_copies_and_separator_lines_do_not_loop() -> None:
    # "repeat the request" and "two responses" give two copies; "***" separates paragraphs.
    two = "Write a poem.\nRoses are red.\n******\nWrite a poem.\nViolets are blue."
    paragraphs = "First part.\n***\nSecond part.\n***\nThird part.\n***\nFourth part."
    assert repeated_line(two) is None and not loops(two)
    assert repeated_line(paragraphs) is None and not loops(paragraphs)


def test_a_phrase_looping_inside_one_line_loops() -> None:
    answer = "The plan: " + "we go to the shop and buy bread " * 3
    assert repeated_phrase(answer) == "we go to the shop and buy bread"
    assert loops(answer)


def test_overlapping_copies_of_a_phrase_count_once() -> None:
    # Nine identical words hold two overlapping eight-word runs, not two repeats.
    assert repeated_phrase("yes " * 9) is None
    assert repeated_phrase("yes " * 24) == " ".join(["yes"] * 8)


def test_ordinary_prose_and_distinct_list_items_do_not_loop() -> None:
    answer = (
        "Section 1: Why sleep matters\nSleep restores the body.\n"
        "Section 2: How much\nAdults need seven hours.\n"
        "Section 3: Tips\n* Keep a schedule.\n* Avoid screens late.\n* Keep the room cool."
    )
    assert not loops(answer)
    assert not loops("")
