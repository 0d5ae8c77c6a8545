import pytest

from policies.principles import DEFAULT_PRINCIPLE_PAIRS, PrinciplePair, pick_principle, rlcd_messages


def test_at_least_four_distinct_principles_with_opposite_sides():
    names = [pair.name for pair in DEFAULT_PRINCIPLE_PAIRS]

    assert len(names) >= 4 and len(set(names)) == len(names)
    assert {"helpfulness", "harmlessness", "conciseness", "honesty"} <= set(names)
    assert all(pair.positive != pair.negative for pair in DEFAULT_PRINCIPLE_PAIRS)


def test_each_side_is_one_sentence():
    for pair in DEFAULT_PRINCIPLE_PAIRS:
        for side in (pair.positive, pair.negative):
            assert side.endswith(".") and side.count(".") == 1


def test_messages_put_the_chosen_side_in_system_and_the_instruction_as_user():
    pair = DEFAULT_PRINCIPLE_PAIRS[0]

    assert rlcd_messages("Explain tides.", pair, positive=True) == [
        {"role": "system", "content": pair.positive},
        {"role": "user", "content": "Explain tides."},
    ]
    assert rlcd_messages("Explain tides.", pair, positive=False)[0]["content"] == pair.negative


def test_pick_principle_is_round_robin():
    count = len(DEFAULT_PRINCIPLE_PAIRS)

    assert [pick_principle(i) for i in range(count)] == list(DEFAULT_PRINCIPLE_PAIRS)
    assert pick_principle(count + 1) == DEFAULT_PRINCIPLE_PAIRS[1]


def test_pick_principle_uses_the_given_pairs():
    custom = [PrinciplePair("x", "Be x.", "Be not x."), PrinciplePair("y", "Be y.", "Be not y.")]

    assert pick_principle(3, custom).name == "y"


def test_pick_principle_rejects_empty_pairs_and_negative_index():
    with pytest.raises(ValueError):
        pick_principle(0, [])
    with pytest.raises(ValueError):
        pick_principle(-1)
