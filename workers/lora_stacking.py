"""Two LoRA adapters in a row as one adapter, exactly: the arithmetic of lineage adapters.

An adapter applied to a model that already has another adapter merged into it equals one adapter
on the unmerged model whose ranks are the two adapters' ranks side by side. A LoRA module adds
``s · B @ A`` to its weight (``s = lora_alpha / r``), so with A1 (r1 × in), B1 (out × r1), A2, B2::

    W0 + s1·B1@A1 + s2·B2@A2 == W0 + [s1·B1, s2·B2] @ [A1; A2]

The stacked adapter has rank ``r1 + r2`` and ``lora_alpha = r1 + r2`` (its own scaling is 1, the
scalings live in B). A module only one adapter targets gets zero rows and columns from the other.
Stacking is exact up to float rounding; nothing is approximated or truncated.

Only plain LoRA stacks this way: rsLoRA scales by ``alpha / sqrt(r)``, DoRA rescales the whole
weight by its column norms (not additive), a trained bias or fully saved module is not a low-rank
term, and per-module ranks or alphas (``rank_pattern``, ``alpha_pattern``) change ``s`` per module.
:func:`stacking_refusal` names the reason an adapter config cannot be stacked, and
:func:`stack_adapters` then writes nothing and returns None.

The files are PEFT's (``save_pretrained``): ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight``, which vLLM loads as they are.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors.torch import load_file, save_file

log = structlog.get_logger(__name__)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "read_adapter_config", "stack_adapters", "stacking_refusal"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"

# The config entries stacking relies on and the value each must have (a missing entry is PEFT's
# default, which is this value). Anything else makes the adapter more than ``s · B @ A`` per module.
_PLAIN_LORA: dict[str, Any] = {
    "peft_type": "LORA",
    "use_rslora": False,
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def stacking_refusal(config: Mapping[str, Any]) -> str | None:
    """Why the adapter with this ``adapter_config.json`` content cannot be stacked; None: it can."""
    for key, plain in _PLAIN_LORA.items():
        value = config.get(key, plain)
        if not _is_plain(value, plain):
            return f"{key} is {value!r} (stacking takes plain LoRA: {key} {plain!r})"
    return None


def _is_plain(value: Any, plain: Any) -> bool:
    if plain is None or plain == {}:
        return not value  # None, [] and {} all mean "none" in PEFT's configs
    return bool(value == plain)


def stack_adapters(first: str | Path, second: str | Path, out: str | Path) -> int | None:
    """Write to ``out`` the adapter that equals ``first`` then ``second`` (``second`` trained on
    the model with ``first`` merged in), relative to ``first``'s base model; return its rank.

    None, with nothing written, when either adapter is not plain LoRA (:func:`stacking_refusal`)
    or holds weights other than LoRA A/B matrices.
    """
    configs = [read_adapter_config(first), read_adapter_config(second)]
    for path, config in zip((first, second), configs, strict=True):
        reason = stacking_refusal(config)
        if reason is not None:
            log.info("lora.not_stacked", adapter=str(path), reason=reason)
            return None
    modules = [_lora_modules(load_file(str(Path(path) / WEIGHTS_NAME)), path) for path in (first, second)]
    if any(m is None for m in modules):
        return None
    ranks = [int(c["r"]) for c in configs]
    scalings = [float(c["lora_alpha"]) / r for c, r in zip(configs, ranks, strict=True)]
    stacked = _stacked_weights(modules[0], modules[1], ranks, scalings)  # type: ignore[arg-type]
    rank = sum(ranks)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(stacked, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(_stacked_config(configs, rank, stacked), indent=2, sort_keys=True), encoding="utf-8")
    return rank


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of the PEFT adapter directory ``adapter``."""
    return json.loads((Path(adapter) / CONFIG_NAME).read_text(encoding="utf-8"))


def _lora_modules(weights: Mapping[str, torch.Tensor], where: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """``{module key prefix: (A, B)}`` of an adapter's weights; None if it holds anything else
    (embedding LoRA, a saved module), which stacking does not cover."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in weights:
        if key.endswith(_A_SUFFIX):
            prefix = key[: -len(_A_SUFFIX)]
            if prefix + _B_SUFFIX in weights:
                modules[prefix] = (weights[key], weights[prefix + _B_SUFFIX])
                continue
        if not (key.endswith(_B_SUFFIX) and key[: -len(_B_SUFFIX)] + _A_SUFFIX in weights):
            log.info("lora.not_stacked", adapter=str(where), reason=f"{key} is not a LoRA A/B pair's weight")
            return None
    return modules


def _stacked_weights(
    first: dict[str, tuple[torch.Tensor, torch.Tensor]],
    second: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ranks: list[int],
    scalings: list[float],
) -> dict[str, torch.Tensor]:
    """The stacked adapter's tensors: per module A = [A1; A2], B = [s1·B1, s2·B2] (zeros where
    an adapter leaves the module alone)."""
    # One dtype for the whole adapter: the widest of the two (float32 for kaizen's trainers).
    dtype = functools.reduce(torch.promote_types, (t.dtype for modules in (first, second) for pair in modules.values() for t in pair))
    stacked: dict[str, torch.Tensor] = {}
    for prefix in sorted(first.keys() | second.keys()):
        pairs = [first.get(prefix), second.get(prefix)]
        known = next(p for p in pairs if p is not None)
        in_features, out_features = known[0].shape[1], known[1].shape[0]
        a_parts, b_parts = [], []
        for pair, rank, scaling in zip(pairs, ranks, scalings, strict=True):
            if pair is None:
                a_parts.append(torch.zeros(rank, in_features, dtype=dtype))
                b_parts.append(torch.zeros(out_features, rank, dtype=dtype))
                continue
            a, b = pair
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise ValueError(f"{prefix}: the adapters disagree on the module's shape ({tuple(a.shape)}, {tuple(b.shape)})")
            # The scaling is applied in float32 so a half-precision adapter is rounded once, at the end.
            a_parts.append(a.to(dtype))
            b_parts.append((b.float() * scaling).to(dtype))
        stacked[prefix + _A_SUFFIX] = torch.cat(a_parts, dim=0).contiguous()
        stacked[prefix + _B_SUFFIX] = torch.cat(b_parts, dim=1).contiguous()
    return stacked


def _stacked_config(configs: list[dict[str, Any]], rank: int, stacked: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The second adapter's config with the stacked rank, scaling 1, and every module either targets.

    ``target_modules`` lists the modules' last names (as PEFT writes for ``all-linear``), which
    PEFT and vLLM both match; ``base_model_name_or_path`` is the first adapter's base, the model
    the stacked adapter applies to."""
    targets = sorted({key[: -len(_A_SUFFIX)].rsplit(".", 1)[-1] for key in stacked if key.endswith(_A_SUFFIX)})
    return {
        **configs[1],
        "r": rank,
        "lora_alpha": rank,
        "target_modules": targets,
        "base_model_name_or_path": configs[0].get("base_model_name_or_path"),
        # A module the names match but neither adapter trained starts at B = 0: no change.
        "init_lora_weights": True,
        "inference_mode": True,
    }
