"""Lineage adapters: two LoRA adapters in a row stacked into one is exact on the tiny model, and
the commit path writes the stacked adapter (listed in the manifest) for a candidate of a
candidate only, up to model.vllm_max_stacked_adapters in a row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.factories import lora_candidate
from workers.checkpoints import read_manifest, verify_checkpoint
from workers.lora_stacking import CONFIG_NAME, stack_adapters, stacking_refusal
from workers.lora_training import ADAPTER_SUBDIR, LINEAGE_ADAPTER_SUBDIR, AdapterRecord, checkpoint_adapter, checkpoint_lineage_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _probe_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return torch.tensor([tokenizer("Describe the water cycle in one sentence.")["input_ids"]])


def _random_adapter(model, *, seed: int, r: int, alpha: int, targets: list[str]):  # type: ignore[no-untyped-def]
    """``model`` with a random LoRA adapter: PEFT's init_lora_weights=False leaves B nonzero, so it changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _with_adapter(model_dir: Path, adapter_dir: Path):  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), str(adapter_dir))


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A first adapter on the tiny model (r 4, α 16, attention only) and a second (r 8, α 8, other
    modules too) on the first one's merged model, with the second's logits on a probe input."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    ids = _probe_ids(tiny_model_dir)
    first = _random_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), seed=1, r=4, alpha=16, targets=["q_proj", "v_proj"])
    first.save_pretrained(str(root / "first"))
    merged = first.merge_and_unload()
    second = _random_adapter(merged, seed=2, r=8, alpha=8, targets=["v_proj", "o_proj", "down_proj"])
    second.save_pretrained(str(root / "second"))
    return {"root": root, "ids": ids, "expected": _logits(second, ids)}


def test_stacked_adapter_on_the_base_equals_the_second_adapter_on_the_merged_first(tiny_model_dir: Path, two_adapters: dict) -> None:
    root, ids, expected = two_adapters["root"], two_adapters["ids"], two_adapters["expected"]
    assert stack_adapters(root / "first", root / "second", root / "stacked") == 12

    config = json.loads((root / "stacked" / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 12)  # its own scaling is 1
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]  # the union
    stacked = _logits(_with_adapter(tiny_model_dir, root / "stacked"), ids)
    assert torch.allclose(stacked, expected, atol=1e-4), (stacked - expected).abs().max()
    # The adapters matter: the base alone answers otherwise, so equality above is not vacuous.
    from transformers import AutoModelForCausalLM

    base = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), ids)
    assert (base - expected).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("entry", "value"), [("use_rslora", True), ("use_dora", True), ("bias", "lora_only"), ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 2})],
)
def test_an_adapter_that_is_not_plain_lora_is_not_stacked(two_adapters: dict, tmp_path: Path, entry: str, value: object) -> None:
    root = two_adapters["root"]
    shutil.copytree(root / "second", tmp_path / "second")
    config = json.loads((tmp_path / "second" / CONFIG_NAME).read_text())
    assert stacking_refusal(config) is None
    (tmp_path / "second" / CONFIG_NAME).write_text(json.dumps({**config, entry: value}))
    assert entry in (stacking_refusal({**config, entry: value}) or "")
    assert stack_adapters(root / "first", tmp_path / "second", tmp_path / "stacked") is None
    assert not (tmp_path / "stacked").exists()


def test_commit_writes_a_lineage_adapter_for_a_candidate_of_a_candidate_up_to_the_limit(tiny_model_dir: Path, tmp_path: Path) -> None:
    def candidate(parent: Path, name: str, seed: int, rank: int = 8) -> Path:
        return lora_candidate(parent, tmp_path / name, seed=seed, rank=rank, max_stacked_adapters=2)

    first = candidate(tiny_model_dir, "c1", seed=1)
    second = candidate(first, "c2", seed=2, rank=4)
    third = candidate(second, "c3", seed=3)  # a third adapter in a row: past the limit of 2
    fourth = candidate(third, "c4", seed=4)
    fifth = candidate(fourth, "c5", seed=5)

    # A first candidate: its own adapter is already relative to the root; nothing more.
    assert checkpoint_lineage_adapter(first) is None and not (first / LINEAGE_ADAPTER_SUBDIR).exists()
    assert "lineage_start" not in read_manifest(first).metadata

    lineage = checkpoint_lineage_adapter(second)
    assert lineage == AdapterRecord(second / LINEAGE_ADAPTER_SUBDIR, str(tiny_model_dir), 12, 2)
    assert checkpoint_adapter(second) == AdapterRecord(second / ADAPTER_SUBDIR, str(first), 4)
    manifest = verify_checkpoint(second, checksums=True)  # the stacked adapter's files are hashed too
    listed = {entry.path for entry in manifest.files}
    assert {f"{LINEAGE_ADAPTER_SUBDIR}/adapter_model.safetensors", f"{LINEAGE_ADAPTER_SUBDIR}/{CONFIG_NAME}"} <= listed
    # The root + the lineage adapter is the second candidate's merged model.
    from transformers import AutoModelForCausalLM

    ids = _probe_ids(tiny_model_dir)
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(second), dtype=torch.float32), ids)
    assert torch.allclose(_logits(_with_adapter(tiny_model_dir, lineage.path), ids), merged, atol=1e-4)
    assert not torch.allclose(_logits(_with_adapter(tiny_model_dir, first / ADAPTER_SUBDIR), ids), merged, atol=1e-2)

    # Past the limit: no lineage adapter, and the checkpoint starts a lineage of its own.
    assert checkpoint_lineage_adapter(third) is None and read_manifest(third).metadata["lineage_start"] is True
    assert checkpoint_lineage_adapter(fourth) is None  # its own adapter is relative to the new root
    assert checkpoint_lineage_adapter(fifth) == AdapterRecord(fifth / LINEAGE_ADAPTER_SUBDIR, str(third), 16, 2)
    for checkpoint in (first, second, third, fourth, fifth):
        verify_checkpoint(checkpoint, checksums=True)


def test_without_a_limit_above_one_no_lineage_adapter_is_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = lora_candidate(tiny_model_dir, tmp_path / "c1", seed=1)
    second = lora_candidate(first, tmp_path / "c2", seed=2)
    assert checkpoint_lineage_adapter(second) is None and read_manifest(second).metadata["lineage_start"] is True
