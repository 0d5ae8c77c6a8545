"""respond decodes the policy samples and the RLCD answers in one generate call, and every
answer still lands on its own prompt, kind, sample index and principle."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.db.models import Response
from policies.repetition import loops
from policies import principles
from tests.factories import run_respond
from workers.runtime import ModelRuntime
from workers.runtime_cache import clear_runtime_cache
from workers.stages.common import user_prompt
from workers.tiny_model import build_tiny_model

PROMPTS = ["hi", "Write a short poem about the sea.", "Explain how photosynthesis works"]
N = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A scaled, untied output layer: greedy answers then depend on the prompt, so a misplaced
    # answer is visible.
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tie_embeddings=False, output_scale=6.0)


@pytest.fixture
def generate_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The per-prompt sample counts of every ModelRuntime.generate call."""
    calls: list[list[int]] = []
    original = ModelRuntime.generate

    def recording(self, prompts, *, num_samples=1, **kwargs):  # type: ignore[no-untyped-def]
        calls.append([num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples))
        return original(self, prompts, num_samples=num_samples, **kwargs)

    monkeypatch.setattr(ModelRuntime, "generate", recording)
    clear_runtime_cache()
    return calls


def _respond(tmp_path: Path, model_dir: Path, **generation: float) -> tuple[list[Response], dict]:
    return run_respond(tmp_path / "data", model_dir, PROMPTS, N, generation={"max_new_tokens": 8, "batch_size": 4, **generation})


def _by_prompt(rows: list[Response]) -> dict[int, list[Response]]:
    grouped: dict[int, list[Response]] = {}
    for row in rows:
        grouped.setdefault(row.prompt_id, []).append(row)
    return dict(sorted(grouped.items()))


def test_policy_and_rlcd_share_one_decode_call(tmp_path: Path, model_dir: Path, generate_calls: list[list[int]]) -> None:
    rows, result = _respond(tmp_path, model_dir, temperature=0.0)
    assert generate_calls == [[N] * len(PROMPTS) + [1] * 2 * len(PROMPTS)]
    assert result["policy"] == N * len(PROMPTS) and result["rlcd_positive"] == result["rlcd_negative"] == len(PROMPTS)

    runtime = ModelRuntime.load(str(model_dir), device="cpu")
    for index, (prompt_text, prompt_rows) in enumerate(zip(PROMPTS, _by_prompt(rows).values(), strict=True)):
        policy = [r for r in prompt_rows if r.kind == "policy"]
        assert [r.sample_index for r in policy] == list(range(N))
        # Greedy: each answer is what its own request decodes alone, so none moved to another prompt.
        alone = runtime.generate([user_prompt(runtime, prompt_text, 8)], temperature=0, max_new_tokens=8)[0][0].text
        assert {r.text for r in policy} == {alone}
        pair = principles.pick_principle(index)
        for kind, positive in (("rlcd_positive", True), ("rlcd_negative", False)):
            (row,) = [r for r in prompt_rows if r.kind == kind]
            request = runtime.render_chat(principles.rlcd_messages(prompt_text, pair, positive), max_new_tokens=8)
            assert row.principle == pair.name
            assert row.text == runtime.generate([request], temperature=0, max_new_tokens=8)[0][0].text
    assert len({r.text for r in rows if r.kind == "policy"}) > 1  # answers depend on the prompt


def test_the_stage_seed_gives_the_same_answers_again(tmp_path: Path, model_dir: Path, generate_calls: list[list[int]]) -> None:
    first, _ = _respond(tmp_path / "a", model_dir, temperature=1.0)
    again, _ = _respond(tmp_path / "b", model_dir, temperature=1.0)
    texts = [(r.kind, r.sample_index, r.principle, r.text) for r in first]
    assert texts == [(r.kind, r.sample_index, r.principle, r.text) for r in again]
    policy = _by_prompt([r for r in first if r.kind == "policy"])
    assert any(len({r.text for r in group}) > 1 for group in policy.values())  # sampled, not one draw repeated


def test_end_bonus_lowers_the_truncation_rate_the_stage_reports(tmp_path: Path, model_dir: Path) -> None:
    generation = {"max_new_tokens": 8, "batch_size": 4, "temperature": 1.0}
    rows, plain = run_respond(tmp_path / "plain", model_dir, PROMPTS, N, generation=generation)
    policy = [r.text for r in rows if r.kind == "policy"]
    assert plain["looping_rate"] == round(sum(map(loops, policy)) / len(policy), 4)
    _, ramped = run_respond(tmp_path / "ramped", model_dir, PROMPTS, N, respond_settings={"end_bonus": 30.0}, generation=generation)
    assert plain["truncation_rate"] > 0.3, "the test model runs most answers to the token cap"
    assert ramped["truncation_rate"] < plain["truncation_rate"] / 2


def test_greedy_sample_adds_each_prompts_greedy_answer_without_the_end_ramp(tmp_path: Path, model_dir: Path) -> None:
    generation = {"max_new_tokens": 8, "batch_size": 4, "temperature": 1.0}
    rows, result = run_respond(
        tmp_path / "data", model_dir, PROMPTS, N, respond_settings={"end_bonus": 30.0, "greedy_sample": True}, generation=generation,
    )
    runtime = ModelRuntime.load(str(model_dir), device="cpu")
    greedy_cut = 0
    for prompt_text, prompt_rows in zip(PROMPTS, _by_prompt(rows).values(), strict=True):
        policy = [r for r in prompt_rows if r.kind == "policy"]
        assert [r.sample_index for r in policy] == list(range(N + 1))
        # The last sample is the prompt's greedy answer as the gate decodes it: no ramp ends it.
        alone = runtime.generate([user_prompt(runtime, prompt_text, 8)], temperature=0, max_new_tokens=8)[0][0]
        assert (policy[-1].text, policy[-1].num_tokens) == (alone.text, alone.num_tokens)
        greedy_cut += alone.num_tokens == 8
    assert result["policy"] == (N + 1) * len(PROMPTS)
    assert greedy_cut > 0, "the test model runs greedy answers to the cap, which the ramp would have ended"
    # Every sampled answer ended under the big ramp; only greedy answers can be cut.
    assert result["truncation_rate"] == pytest.approx(greedy_cut / ((N + 1) * len(PROMPTS)), abs=1e-4)
    assert result["sampled_truncation_rate"] == 0.0
    assert result["greedy_truncation_rate"] == pytest.approx(greedy_cut / len(PROMPTS), abs=1e-4)
