from __future__ import annotations

import math

import pytest

from policies.steering import (
    METHODS,
    SteeringError,
    check_keys,
    parse_attributes,
    parse_beta,
    parse_reward_weights,
    requested_method,
)


def test_a_missing_field_or_method_names_the_default() -> None:
    assert requested_method(None, "urial") == ("urial", {})
    assert requested_method({}, "none")[0] == "none"
    assert requested_method({"method": "genarm", "beta": 2}, "none") == ("genarm", {"method": "genarm", "beta": 2})


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [({"method": "magic"}, f"not one of {list(METHODS)}"), ("urial", "must be an object"), (["urial"], "must be an object")],
)
def test_a_bad_field_says_what_is_allowed(raw, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SteeringError) as error:
        requested_method(raw, "none")
    assert fragment in str(error.value)
    assert error.value.param == "steering"


def test_keys_of_another_method_are_refused_with_the_allowed_ones() -> None:
    check_keys({"method": "genarm", "beta": 1}, "genarm", frozenset({"beta", "reward_models"}))
    with pytest.raises(SteeringError, match=r"\['beta'\] do not apply to method 'none'; allowed: \['method'\]"):
        check_keys({"method": "none", "beta": 1}, "none", frozenset())


def test_reward_weights_are_the_requested_ones_or_every_default() -> None:
    available = {"loop": 1.0, "concise": 0.25}
    assert parse_reward_weights({"concise": 2}, available) == {"concise": 2.0}
    assert parse_reward_weights(None, available) == {"concise": 0.25, "loop": 1.0}


@pytest.mark.parametrize(
    ("requested", "fragment"),
    [
        ({"x": 1}, "unknown reward model 'x'; available: ['loop']"),
        ({"loop": math.nan}, "finite number"),
        ({"loop": True}, "finite number"),
        ({"loop": -0.5}, "must be >= 0"),
        ({}, "non-empty"),
    ],
)
def test_bad_reward_weights_name_the_key(requested, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SteeringError) as error:
        parse_reward_weights(requested, {"loop": 1.0})
    assert fragment in str(error.value)


def test_genarm_without_any_reward_model_says_how_to_configure_one() -> None:
    with pytest.raises(SteeringError, match="genarm_train stage"):
        parse_reward_weights(None, {})


def test_beta_must_be_a_positive_finite_number() -> None:
    assert parse_beta(3) == 3.0
    for bad, fragment in ((-1, "must be > 0"), (0, "must be > 0"), (math.inf, "finite number"), ("1", "finite number")):
        with pytest.raises(SteeringError, match=fragment):
            parse_beta(bad)


def test_attributes_are_completed_with_defaults_and_checked() -> None:
    values = parse_attributes({"humor": 3})
    assert values["humor"] == 3 and len(values) > 1
    with pytest.raises(SteeringError, match="steering.attributes: .*unknown attribute 'wit'"):
        parse_attributes({"wit": 1})
    with pytest.raises(SteeringError, match="must be an object"):
        parse_attributes([1])
