from __future__ import annotations

import math

import pytest

from policies.steering import SteeringError, SteeringSpec, parse_steering, stop_strings_for


def test_missing_steering_takes_the_deployment_default() -> None:
    assert parse_steering(None, default_method="urial") == SteeringSpec("urial")
    assert parse_steering({}, default_method="none").method == "none"


def test_genarm_uses_requested_weights_or_the_configured_defaults() -> None:
    available = {"loop": 1.0, "concise": 0.25}
    spec = parse_steering({"method": "genarm", "reward_models": {"concise": 2}, "beta": 0.5}, reward_models=available)
    assert spec.reward_weights == (("concise", 2.0),)
    assert spec.beta == 0.5
    assert parse_steering({"method": "genarm"}, reward_models=available, default_beta=3.0) == SteeringSpec(
        "genarm", reward_weights=(("concise", 0.25), ("loop", 1.0)), beta=3.0
    )


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"method": "magic"}, "not one of ['none', 'urial', 'steerlm', 'genarm']"),
        ({"method": "none", "beta": 1}, "do not apply to method 'none'"),
        ({"method": "genarm", "reward_models": {"x": 1}}, "unknown reward model 'x'; available: ['loop']"),
        ({"method": "genarm", "reward_models": {"loop": math.nan}}, "finite number"),
        ({"method": "genarm", "reward_models": {"loop": True}}, "finite number"),
        ({"method": "genarm", "beta": -1}, "beta must be > 0"),
        ({"method": "genarm", "reward_models": {"loop": -0.5}}, "must be >= 0"),
        ({"method": "genarm", "reward_models": {}}, "non-empty"),
        ("urial", "must be an object"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(raw, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SteeringError) as error:
        parse_steering(raw, reward_models={"loop": 1.0})
    assert fragment in str(error.value)


def test_genarm_without_any_reward_model_says_how_to_configure_one() -> None:
    with pytest.raises(SteeringError, match="genarm_train stage"):
        parse_steering({"method": "genarm"}, reward_models={})


def test_stop_strings_add_the_urial_marker_once() -> None:
    assert stop_strings_for("none", ["\n\n", ""]) == ["\n\n"]
    assert stop_strings_for("urial", ["# Query:"]).count("# Query:") == 1
