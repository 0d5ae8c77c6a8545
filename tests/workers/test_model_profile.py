"""Model profiles of tiny Llama / GPT-2 / Qwen2 / GPT-NeoX models, context checks in the runtime,
the server's thread count, and GenARM on transformers' current cache API."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from daemon.bootstrap import initialise
from policies.model_profile import ContextLengthExceeded
from tests.factories import small_cycle_settings
from workers.runtime import ModelRuntime
from workers.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {
        "gpt2": build_tiny_model(root / "gpt2", arch="gpt2", hidden_size=32, chat_template=None, context_length=256, pad_token=False),
        "qwen2": build_tiny_model(root / "qwen2", arch="qwen2", hidden_size=32, chat_template="chatml", context_length=1024),
        "neox": build_tiny_model(root / "neox", arch="gpt_neox", hidden_size=32, chat_template=None, context_length=512),
    }


def test_profiles_read_context_template_and_special_tokens_off_each_architecture(models: dict[str, Path]) -> None:
    gpt2 = ModelRuntime.load(str(models["gpt2"]))
    assert (gpt2.profile.context_length, gpt2.profile.context_source) == (256, "config")  # GPT-2's n_positions
    assert gpt2.profile.prompt_format == "urial" and gpt2.profile.stop_strings == ("# Query:",)
    assert gpt2.profile.pad_token_id is None and gpt2.pad_token_id == gpt2.tokenizer.eos_token_id  # no pad: eos pads
    qwen = ModelRuntime.load(str(models["qwen2"]))
    assert qwen.profile.prompt_format == "chat_template" and qwen.profile.context_length == 1024
    assert qwen.profile.eos_token_ids == (qwen.tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert qwen.render_chat([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    neox = ModelRuntime.load(str(models["neox"]), prompt_format="plain", context_length=300)
    assert (neox.profile.context_length, neox.profile.context_source, neox.profile.prompt_format) == (300, "model.context_length", "plain")


def test_an_over_long_prompt_is_refused_before_the_model_sees_it(models: dict[str, Path]) -> None:
    runtime = ModelRuntime.load(str(models["gpt2"]))
    long_prompt = "Describe the water cycle. " * 100
    assert not runtime.fits(long_prompt, 8)
    with pytest.raises(ContextLengthExceeded, match="256 tokens"):
        runtime.generate([long_prompt], max_new_tokens=8)
    with pytest.raises(ContextLengthExceeded):
        runtime.token_logprobs([long_prompt], [" yes"])
    short = "Describe rain."
    room = runtime.profile.context_length - runtime.prompt_tokens(short)
    assert len(runtime.generate([short], max_new_tokens=room, temperature=0.0)[0]) == 1  # exactly full is fine
    with pytest.raises(ContextLengthExceeded):
        runtime.generate([short], max_new_tokens=room + 1)


def test_urial_rendering_drops_examples_until_the_answer_fits(models: dict[str, Path]) -> None:
    runtime = ModelRuntime.load(str(models["neox"]))
    messages = [{"role": "user", "content": "Name a color."}]
    full = runtime.render_chat(messages)
    fitted = runtime.render_chat(messages, max_new_tokens=32)
    assert not runtime.fits(full, 32) and runtime.fits(fitted, 32)
    assert fitted.endswith("# Query:\nName a color.\n\n# Answer:\n") and fitted.count("# Query:") < full.count("# Query:")


def test_genarm_guidance_uses_the_cache_api_without_deprecation_warnings(tiny_model_dir: Path) -> None:
    from workers.genarm import guided_generate

    base = ModelRuntime.load(str(tiny_model_dir))
    guide = ModelRuntime.load(str(tiny_model_dir))
    prompts = [base.render_chat([{"role": "user", "content": "Name a color."}])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided = guided_generate(base, [(guide, 1.0)], prompts, beta=1.0, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    assert not [w for w in caught if "past_key_values" in str(w.message) or "cache" in str(w.message).lower()]
    assert guided[0].num_tokens >= 1


@pytest.mark.parametrize("threads", [1, 3])
def test_the_server_process_computes_with_model_cpu_threads(tmp_path: Path, tiny_model_dir: Path, threads: int) -> None:
    from daemon.serving import build_app

    settings = small_cycle_settings(tmp_path / "data", tiny_model_dir, model={"cpu_threads": threads})
    initialise(settings)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # whatever the test process had, the server sets its own
        with TestClient(build_app(settings), base_url="http://127.0.0.1") as client:
            health = client.get("/healthz").json()
        assert health["torch_threads"] == threads
        assert health["context_length"] == 2048 and health["prompt_format"] == "chat_template"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("backend", "mode"), [("self", "logprob"), ("self", "text"), ("implicit", "logprob")])
def test_a_judge_prompt_over_the_context_is_a_missing_score_not_a_crash(tmp_path: Path, models: dict[str, Path], backend: str, mode: str) -> None:
    from workers.judges import build_judge
    from workers.judges.base import OVER_CONTEXT

    settings = small_cycle_settings(tmp_path / "data", models["gpt2"], judge={"mode": mode, "max_new_tokens": 4, "num_samples": 1})
    runtime = ModelRuntime.load(str(models["gpt2"]))
    path = str(models["gpt2"])
    judge = build_judge(settings, "train", policy_path=path, load_model=lambda _: runtime, initial_path=path, backends=[backend])
    long_answer = "The water cycle moves water between the sea, the air and the land. " * 40
    scores = judge.score([("Describe rain.", long_answer), ("Hi", "Hello.")])
    assert scores[0].value is None and scores[0].parse_error == OVER_CONTEXT
    comparisons = judge.compare([("Describe rain.", long_answer, "Rain.")])
    assert comparisons[0].preference is None


def test_an_evaluation_item_over_the_context_is_an_empty_truncated_answer(tmp_path: Path, models: dict[str, Path]) -> None:
    from workers.evaluation import greedy_answers

    # plain format: the URIAL preamble alone is longer than 256 tokens of this tiny tokenizer
    settings = small_cycle_settings(tmp_path / "data", models["gpt2"], eval={"max_new_tokens": 8}, model={"prompt_format": "plain"})
    answers = greedy_answers(settings, str(models["gpt2"]), ["Describe the water cycle. " * 60, "Describe rain."])
    assert (answers[0].text, answers[0].finished) == ("", False)
    assert answers[1].num_tokens >= 1
