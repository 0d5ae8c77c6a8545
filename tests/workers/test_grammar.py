"""workers.grammar.checked_json_schema: what vLLM's structured outputs get is checked by llguidance first."""

import pytest

from workers.grammar import GrammarError, checked_json_schema


def test_json_object_becomes_any_object_and_a_valid_schema_passes_unchanged() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert checked_json_schema({}) == {"type": "object"}
    assert checked_json_schema(schema) == schema


@pytest.mark.parametrize(
    ("schema", "reason"),
    [({"type": "no-such-type"}, "Invalid type: no-such-type"), ({"$ref": "#/defs/missing"}, "'/defs/missing' does not exist")],
)
def test_a_schema_no_grammar_can_express_is_refused_with_the_reason(schema: dict, reason: str) -> None:
    # Twice: compilations are shared between requests, refusals too.
    for _ in range(2):
        with pytest.raises(GrammarError, match=reason):
            checked_json_schema(schema)
