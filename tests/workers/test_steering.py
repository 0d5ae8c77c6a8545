"""The steering registry: every method is one module behind one interface, and a new method
plugs in by one entry in policies.steering.METHODS."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon.config import ServeSettings, Settings
from policies import steering as steering_registry
from policies.steering import SteeringError, SteeringSpec
from policies.steerlm import ATTRIBUTE_LINE_PREFIX
from policies.urial import URIAL_STOP
from workers.generation import Generation
from workers.steering import DecodeParams, SamplingDecoder, SteeringMethod, SteeringMethods, SteeringResources, method_class

PARAMS = DecodeParams(max_tokens=8, temperature=0.0, top_p=1.0, n=2, seed=3, stop=("\n\n", ""))


@dataclass
class FakeRuntime:
    """Records what it was asked to decode and answers with fixed text."""

    answer: str = "an answer"
    calls: list[dict[str, Any]] = field(default_factory=list)
    model_path: str = "fake"

    def render_chat(self, messages: list[dict], *, max_new_tokens: int | None = None) -> str:
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    def render_urial(self, messages: list[dict], preset: Any = None, *, max_new_tokens: int | None = None) -> str:
        from policies.urial import render_urial_prompt

        return render_urial_prompt(messages, preset)

    def generate(self, prompts: list[str], *, num_samples: int, **kwargs: Any) -> list[list[Generation]]:
        self.calls.append({"prompts": prompts, "num_samples": num_samples, **kwargs})
        return [[Generation(self.answer, 3, True) for _ in range(num_samples)] for _ in prompts]


def methods(**serve: Any) -> SteeringMethods:
    settings = ServeSettings(**serve)
    return SteeringMethods(SteeringResources(settings, sessions=None, load_model=lambda path: FakeRuntime(model_path=path)), settings.default_steering)  # type: ignore[arg-type]


def test_every_registered_name_is_a_method_of_that_name_and_the_config_allows_exactly_those() -> None:
    for name in steering_registry.METHODS:
        assert method_class(name).name == name
    assert typing.get_args(ServeSettings.model_fields["default_steering"].annotation) == tuple(steering_registry.METHODS)
    assert set(methods()) == set(steering_registry.METHODS)


def test_a_request_without_steering_takes_the_deployment_default() -> None:
    assert methods(default_steering="urial").parse(None) == SteeringSpec("urial")
    assert methods().parse({}) == SteeringSpec("none")


def test_genarm_options_default_to_the_configured_weights_and_beta() -> None:
    registry = methods(genarm={"beta": 3.0, "reward_models": {"concise": {"path": "/m/concise", "weight": 0.25}}})
    assert registry.parse({"method": "genarm"}) == SteeringSpec("genarm", {"reward_models": {"concise": 0.25}, "beta": 3.0})
    spec = registry.parse({"method": "genarm", "reward_models": {"concise": 2}, "beta": 0.5})
    assert spec.describe() == {"method": "genarm", "reward_models": {"concise": 2.0}, "beta": 0.5}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"method": "magic"}, "not one of ['none', 'urial', 'steerlm', 'genarm']"),
        ({"method": "none", "beta": 1}, "do not apply to method 'none'"),
        ({"method": "urial", "attributes": {}}, "do not apply to method 'urial'"),
        ({"method": "steerlm", "attributes": {"humor": 9}}, "humor must be from 0 to 4"),
        ({"method": "genarm", "reward_models": {"x": 1}}, "unknown reward model 'x'; available: ['loop']"),
        ({"method": "genarm", "beta": -1}, "beta must be > 0"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(raw, fragment) -> None:  # type: ignore[no-untyped-def]
    registry = methods(genarm={"reward_models": {"loop": {"path": "/m/loop"}}})
    with pytest.raises(SteeringError) as error:
        registry.parse(raw)
    assert fragment in str(error.value)


def test_none_uses_the_chat_template_and_plain_sampling_with_the_callers_stops() -> None:
    registry, runtime = methods(), FakeRuntime()
    spec = registry.parse({"method": "none"})
    assert registry["none"].render_chat(runtime, [{"role": "user", "content": "hi"}], spec) == "user:hi|assistant:"
    assert registry["none"].render_completion(runtime, "raw text", spec) == "raw text"
    generations = registry["none"].decoder(runtime, spec).decode("p", PARAMS)
    assert [g.text for g in generations] == ["an answer", "an answer"]
    assert runtime.calls[0]["stop_strings"] == ["\n\n"] and runtime.calls[0]["seed"] == 3


def test_urial_renders_examples_without_a_template_and_stops_at_the_next_query() -> None:
    registry, runtime = methods(), FakeRuntime(answer=f"Paris.\n\n{URIAL_STOP[:4]}")
    spec = registry.parse({"method": "urial"})
    prompt = registry["urial"].render_completion(runtime, "Capital of France?", spec)
    assert prompt.endswith("# Query:\nCapital of France?\n\n# Answer:\n") and "assistant:" not in prompt
    decoder = registry["urial"].decoder(runtime, spec)
    # The partial marker a token limit leaves behind is cut from the finished text.
    assert [g.text for g in decoder.decode(prompt, PARAMS)] == ["Paris.", "Paris."]
    assert runtime.calls[0]["stop_strings"] == ["\n\n", URIAL_STOP]


def test_steerlm_puts_the_attribute_line_in_the_system_message() -> None:
    registry, runtime = methods(), FakeRuntime()
    spec = registry.parse({"method": "steerlm", "attributes": {"humor": 3}})
    prompt = registry["steerlm"].render_chat(runtime, [{"role": "user", "content": "hi"}], spec)
    assert prompt.startswith(f"system:{ATTRIBUTE_LINE_PREFIX}") and "humor:3" in prompt and prompt.endswith("user:hi|assistant:")


class ShoutSteering(SteeringMethod):
    """A demonstration method: one class, one registry entry, nothing else changed."""

    name = "shout"
    option_keys = frozenset({"volume"})

    def options(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {"volume": int(raw.get("volume", 1))}

    def render_chat(self, runtime: Any, messages: list[dict], spec: SteeringSpec) -> str:
        return runtime.render_chat([{**m, "content": m["content"].upper() + "!" * spec.options["volume"]} for m in messages])

    def decoder(self, runtime: Any, spec: SteeringSpec) -> SamplingDecoder:
        return SamplingDecoder(runtime, finish=str.upper)


def test_a_new_method_plugs_in_with_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(steering_registry.METHODS, "shout", f"{__name__}:ShoutSteering")
    registry, runtime = methods(), FakeRuntime()
    spec = registry.parse({"method": "shout", "volume": 2})
    assert spec.describe() == {"method": "shout", "volume": 2}
    assert registry["shout"].render_chat(runtime, [{"role": "user", "content": "hi"}], spec) == "user:HI!!|assistant:"
    assert registry["shout"].decoder(runtime, spec).decode("p", PARAMS)[0].text == "AN ANSWER"
    with pytest.raises(SteeringError, match=r"do not apply to method 'shout'"):
        registry.parse({"method": "shout", "beta": 1})


def test_a_registry_entry_that_names_something_else_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(steering_registry.METHODS, "loud", f"{__name__}:ShoutSteering")
    with pytest.raises(TypeError, match="is not a SteeringMethod named 'loud'"):
        method_class("loud")


def test_settings_reject_a_default_method_that_is_not_registered() -> None:
    with pytest.raises(ValueError, match="default_steering"):
        Settings(serve={"default_steering": "magic"})
