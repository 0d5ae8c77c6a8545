"""GenARM guidance on model.engine: vllm: the vLLM logits processor decodes the tokens the HF path decodes.

Greedy, on the tiny model (hidden size 128, as test_vllm_engine) guided by a smaller random reward
model that shares its tokenizer: guided requests of different prompt lengths and a plain one share
the engine's batch, finish at different steps (so vLLM removes rows and moves others into them),
and one joins while the others are decoding. Needs vLLM; skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (model.engine: vllm; install with ops/install_vllm.sh, README 'vLLM engine')")

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from policies.self_instruct import load_seed_prompts  # noqa: E402
from workers.genarm import RewardGuidance, guided_generate  # noqa: E402
from workers.genarm.vllm_processor import GenArmLogitsProcessor, guidance_extra_args  # noqa: E402
from workers.runtime import ModelRuntime  # noqa: E402
from workers.stages.common import user_prompt  # noqa: E402
from workers.tiny_model import build_tiny_model  # noqa: E402
from workers.vllm_engine import ENGINE_LOCK, VllmRuntime, stop_vllm_engine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BETA = 0.5
QUESTIONS = ["hi", "Write a short poem about the sea.", "Explain how photosynthesis works in plants, step by step", "Name a colour"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # As test_vllm_engine: head size 32 for vLLM's CPU attention, a scaled untied output layer.
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "base", hidden_size=128, extra_corpus=load_seed_prompts(), tie_embeddings=False, output_scale=6.0,
    )


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    """A smaller, differently seeded model with the base's tokenizer (same corpus): sharp enough
    (output scale 6) that its log-probs change greedy tokens at β = 0.5."""
    path = build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "reward", hidden_size=64, seed=1, extra_corpus=load_seed_prompts(), tie_embeddings=False, output_scale=6.0,
    )
    return ModelRuntime.load(str(path), device="cpu")


@pytest.fixture(scope="module")
def runtimes(base_dir: Path) -> tuple[ModelRuntime, VllmRuntime]:
    yield ModelRuntime.load(str(base_dir), device="cpu"), VllmRuntime.load(str(base_dir), kv_cache_gib=0.25)
    stop_vllm_engine()


def hf_guided_ids(hf: ModelRuntime, guidance: RewardGuidance | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids through the HF GenARM processor (one unpadded row), cut after the first EOS."""
    ids = torch.tensor([prompt_ids])
    processors = LogitsProcessorList(guidance(ids, torch.ones_like(ids)) if guidance is not None else [])
    with torch.inference_mode():
        out = hf.model.generate(
            ids, attention_mask=torch.ones_like(ids), logits_processor=processors, do_sample=False, max_new_tokens=max_tokens,
            pad_token_id=hf.pad_token_id,
        )[0, ids.shape[1] :].tolist()
    eos = next((k for k, t in enumerate(out) if t in hf.eos_token_ids), None)
    return out if eos is None else out[: eos + 1]


@pytest.fixture
def batch_updates(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every non-empty BatchUpdate the engine's GenARM processor receives."""
    seen: list = []
    original = GenArmLogitsProcessor.update_state

    def recording(self, batch_update):  # type: ignore[no-untyped-def]
        if batch_update is not None:
            seen.append((list(batch_update.removed), [a[0] for a in batch_update.added], list(batch_update.moved)))
        return original(self, batch_update)

    monkeypatch.setattr(GenArmLogitsProcessor, "update_state", recording)
    return seen


def test_guided_and_plain_requests_in_one_batch_decode_the_hf_paths_tokens(runtimes, reward, batch_updates) -> None:
    hf, vllm = runtimes
    guidance = RewardGuidance((reward.model,), (1.0,), BETA)
    extra = guidance_extra_args(guidance)
    prompts = [hf.encode_prompt(user_prompt(hf, q)) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different prompt lengths
    # (prompt, guided?, max tokens): the plain request in the middle stops first, so vLLM removes
    # its row and moves the last request into it; the last one joins after three steps.
    requests = [(prompts[0], True, 14), (prompts[1], False, 4), (prompts[2], True, 10), (prompts[3], True, 12)]
    outputs: dict[str, list[int]] = {}
    with ENGINE_LOCK:
        engine = vllm.engine().llm_engine

        def add(k: int) -> None:
            ids, guided, max_tokens = requests[k]
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra if guided else None)
            engine.add_request(str(k), TokensPrompt(prompt_token_ids=ids), params)

        for k in range(3):
            add(k)
        steps = 0
        while engine.has_unfinished_requests():
            if steps == 3:
                add(3)
            for output in engine.step():
                if output.finished:
                    outputs[output.request_id] = list(output.outputs[0].token_ids)
            steps += 1

    for k, (ids, guided, max_tokens) in enumerate(requests):
        expected = hf_guided_ids(hf, guidance if guided else None, ids, max_tokens)
        assert outputs[str(k)] == expected, f"request {k} (guided: {guided})"
    # The guidance is visible: every guided request decodes other tokens than plain greedy.
    for ids, guided, max_tokens in requests:
        if guided:
            assert hf_guided_ids(hf, None, ids, max_tokens) != hf_guided_ids(hf, guidance, ids, max_tokens)
    assert any(removed for removed, _, _ in batch_updates)
    assert any(moved for _, _, moved in batch_updates)
    assert any(added for _, added, _ in batch_updates[1:])  # the late request joined a running batch


def test_guided_generate_through_vllm_equals_it_through_hf(runtimes, reward) -> None:
    hf, vllm = runtimes
    prompts = [user_prompt(hf, q) for q in QUESTIONS]
    decode = {"beta": BETA, "max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": 0}

    assert guided_generate(vllm, [(reward, 1.0)], prompts, **decode) == guided_generate(hf, [(reward, 1.0)], prompts, **decode)
    # Weight 0 runs no reward model: the plain greedy answers.
    plain = [samples[0] for samples in vllm.generate(prompts, temperature=0, max_new_tokens=12)]
    assert guided_generate(vllm, [(reward, 0.0)], prompts, **decode) == plain
    # Sampling with guidance: n samples per prompt, reproducible for a seed.
    sampled = [vllm.generate(prompts[:2], num_samples=2, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3,
                             logits_processors=RewardGuidance((reward.model,), (1.0,), BETA)) for _ in range(2)]
    assert sampled[0] == sampled[1] and [len(s) for s in sampled[0]] == [2, 2]


def test_the_vllm_engine_refuses_other_logits_processors(runtimes) -> None:
    _, vllm = runtimes
    with pytest.raises(ValueError, match="RewardGuidance"):
        vllm.generate(["hi"], max_new_tokens=2, logits_processors=lambda ids, mask: [])
