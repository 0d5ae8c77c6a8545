import json

import pytest

from ops.make_instruct_checks import EVAL_STEMS, GATE_STEMS, PACKAGED, build_items, render_jsonl
from policies.self_instruct import ngram_overlap
from policies.constraints import KINDS, Constraint, check
from policies.stats import minimum_detectable_difference
from policies.suites import (
    scored_failing,
    SUITES,
    ItemResult,
    config_hash,
    instruct_checks_text,
    load_instruct_checks,
    load_packaged,
    packaged_text,
    paired_difference,
    parse_items,
    reference_matches,
    score_item,
    suite_spec,
    summarize,
)


def test_packaged_suites_are_what_the_generator_writes():
    assert instruct_checks_text() == render_jsonl(build_items())
    assert [packaged_text(name) for name in ("instruct-checks", "gate-checks")] == [
        render_jsonl(build_items(suite)) for suite in PACKAGED]


def test_the_gate_suite_shares_no_stem_or_item_with_the_reported_suite():
    # The gate decides on gate-checks; instruct-checks is only ever measured, never selected on.
    gate, reported = load_packaged("gate-checks"), load_instruct_checks()

    assert len(gate) == 240 and {item.task for item in gate} == set(GATE_STEMS)
    assert max(ngram_overlap(a, b) for a in GATE_STEMS for b in EVAL_STEMS) <= 0.5
    assert not {item.prompt for item in gate} & {item.prompt for item in reported}
    assert not {item.id for item in gate} & {item.id for item in reported}


def test_suite_has_enough_items_with_one_to_three_valid_constraints():
    items = load_instruct_checks()
    raw = [json.loads(line) for line in instruct_checks_text().splitlines()]

    assert len(items) >= 200
    assert len({item.id for item in items}) == len(items)
    assert all(1 <= len(item.constraints) <= 3 for item in items)
    assert {c.kind for item in items for c in item.constraints} == set(KINDS)
    assert {r["task"] for r in raw} == set(EVAL_STEMS)
    for record, item in zip(raw, items, strict=True):
        assert item.prompt.startswith(record["task"])
        for constraint in item.constraints:
            if constraint.kind == "repeat_request":
                assert constraint.param("request") == record["task"]


def test_an_item_scores_one_only_when_every_constraint_holds():
    item = parse_items(json.dumps({"id": "x", "prompt": "Say hi.", "constraints": [
        {"kind": "lowercase"}, {"kind": "max_words", "n": 3}]}), "t.jsonl")[0]

    good = score_item(item, "hi there friend")
    half = score_item(item, "Hi there friend")

    assert (good.score, good.passed) == (1.0, (True, True))
    assert (half.score, half.passed) == (0.0, (False, True))
    assert half.kinds == ("lowercase", "max_words")


def test_reference_items_match_normalised_whole_words():
    assert reference_matches("Paris", "The capital is **paris**.")
    assert reference_matches("New York", "new-york, of course")
    assert not reference_matches("Paris", "Comparison shopping")
    assert not reference_matches("4", "It is 42.")
    item = parse_items('{"prompt": "2+2?", "reference": "4"}', "r.jsonl")[0]
    assert (item.id, score_item(item, "It is 4.").score) == ("1", 1.0)


def test_summary_has_the_mean_its_interval_and_per_kind_rates():
    results = [
        ItemResult("a", "x", (True, False), 0.0, ("lowercase", "no_commas")),
        ItemResult("b", "y", (True, True), 1.0, ("lowercase", "no_commas")),
        ItemResult("c", "z", (False,), 0.0, ("lowercase",)),
        ItemResult("d", "w", (True,), 1.0, ("title",)),
    ]

    summary = summarize(results)

    assert (summary.score, summary.n) == (0.5, 4)
    assert summary.ci_low < 0.5 < summary.ci_high
    assert summary.per_kind == {"lowercase": pytest.approx(2 / 3), "no_commas": 0.5, "title": 1.0}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 1"),
        ('{"constraints": [{"kind": "lowercase"}]}', "non-empty string \"prompt\""),
        ('{"prompt": "x"}', "exactly one of"),
        ('{"prompt": "x", "reference": "a", "constraints": []}', "exactly one of"),
        ('{"prompt": "x", "constraints": []}', "non-empty list"),
        ('{"prompt": "x", "constraints": [{"kind": "shouting"}]}', "unknown constraint kind"),
        ('{"prompt": "x", "reference": "?!"}', "at least one word"),
    ],
)
def test_bad_items_are_refused_with_the_line_and_the_fix(line, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_items("\n" + line, "mine.jsonl")
    assert "mine.jsonl line 2" in str(info.value)


def test_empty_files_and_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="no items"):
        parse_items("\n\n", "e.jsonl")
    with pytest.raises(ValueError, match="unique"):
        parse_items('{"id": 1, "prompt": "a", "reference": "b"}\n{"id": "1", "prompt": "c", "reference": "d"}', "d.jsonl")


def test_config_hash_covers_suite_decoding_and_content_only():
    base = config_hash("instruct-checks", {"max_new_tokens": 160}, "abc")

    assert base == config_hash("instruct-checks", {"max_new_tokens": 160}, "abc")
    assert base != config_hash("jsonl", {"max_new_tokens": 160}, "abc")
    assert base != config_hash("instruct-checks", {"max_new_tokens": 200}, "abc")
    assert base != config_hash("instruct-checks", {"max_new_tokens": 160}, "abd")


def test_suite_registry_refuses_unknown_names():
    assert set(SUITES) == {"instruct-checks", "gate-checks", "jsonl", "pairwise-vs-initial"}
    with pytest.raises(ValueError, match="allowed: gate-checks, instruct-checks, jsonl, pairwise-vs-initial"):
        suite_spec("mmlu")


def test_some_suite_items_are_satisfiable_by_a_plain_answer():
    # Contrast needs chance passes: a plain lowercase answer passes some items' single constraints.
    plain = "it helps to rest and drink water. i hope this helps"
    singles = [item for item in load_instruct_checks() if len(item.constraints) == 1]
    assert any(check(item.constraints[0], plain) for item in singles)
    assert isinstance(singles[0].constraints[0], Constraint)


def test_paired_difference_matches_items_by_id_and_reports_power():
    a = [{"id": str(i), "score": 1.0} for i in range(30)] + [{"id": "gone", "score": 1.0}]
    b = [{"id": str(i), "score": 1.0 if i < 10 else 0.0} for i in reversed(range(30))] + [{"id": "x", "score": None}]

    paired = paired_difference(a, b, n_resamples=1000, seed=0)

    assert paired.n == 30
    assert (paired.a_score, paired.b_score) == (1.0, pytest.approx(1 / 3))
    assert paired.difference == pytest.approx(2 / 3)
    assert 0 < paired.low < paired.difference <= paired.high
    assert paired.minimum_detectable == pytest.approx(minimum_detectable_difference(30, 2 / 3))
    with pytest.raises(ValueError, match="share no scored items"):
        paired_difference(a[:1], [{"id": "other", "score": 1.0}], n_resamples=100)


def test_scored_failing_scores_only_the_answers_it_names_zero() -> None:
    loop = "[name]\n[name]\n[name]"
    items = [
        {"id": "a", "score": 1.0, "finished": False, "answer": "cut short"},  # passed its checks but was cut
        {"id": "b", "score": 1.0, "finished": True, "answer": loop},  # passed by looping on a format
        {"id": "c", "score": 0.0, "finished": False, "answer": loop},
        {"id": "d", "score": None, "finished": False, "answer": loop},  # unscored stays unscored
        {"id": "e", "score": 1.0, "answer": "Paris."},  # no flag (a reference item) and no loop: left alone
    ]
    assert [item["score"] for item in scored_failing(items, ["cut"])] == [0.0, 1.0, 0.0, None, 1.0]
    assert [item["score"] for item in scored_failing(items, ["loops"])] == [1.0, 0.0, 0.0, None, 1.0]
    assert [item["score"] for item in scored_failing(items, ["cut", "loops"])] == [0.0, 0.0, 0.0, None, 1.0]
    assert [item["score"] for item in scored_failing(items, [])] == [1.0, 1.0, 0.0, None, 1.0]
    assert items[0]["score"] == 1.0, "the input is not modified"
    with pytest.raises(ValueError, match="allowed: cut, loops"):
        scored_failing(items, ["short"])
