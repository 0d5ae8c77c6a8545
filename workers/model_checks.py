"""The checks a model must pass before kaizen uses it, each failure one line naming the key and the fix.

:func:`check_model` is what ``kaizen init`` runs on ``model.path`` (and ``kaizen serve`` on every
``serve.genarm.reward_models`` path, ``kaizen init``/``run``/``cycle`` on ``genarm.base_model_path``):
the path exists (or is a hub id while downloads are allowed), has a config and a loadable
tokenizer with an EOS token, and the model loads and runs one forward pass. It returns the
model's profile (``workers.model_profile``).
"""

from __future__ import annotations

import os
from pathlib import Path

from policies.model_profile import ModelProfile
from policies.prompt_format import PromptFormatError
from workers.model_files import ModelSourceError, is_gguf_file

_OFFLINE_VALUES = {"1", "true", "yes", "on"}


class ModelCheckError(ModelSourceError):
    """A configured model kaizen cannot use; one line naming the config key and the fix."""


def _hub_downloads_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _OFFLINE_VALUES


def _looks_like_path(value: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a missing directory.
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def check_source(path: str, key: str) -> None:
    """The cheap checks: the path exists with a config.json (or is a hub id while downloads are allowed)."""
    local = Path(path).expanduser()
    if is_gguf_file(path):
        if not local.is_file():
            raise ModelCheckError(f"{key}: GGUF file {local} does not exist; set {key} to an existing .gguf file")
        return
    if local.exists():
        if not local.is_dir():
            raise ModelCheckError(f"{key}: {local} is a file, not a model directory; set {key} to a directory saved with save_pretrained, or a .gguf file")
        if not (local / "config.json").is_file():
            raise ModelCheckError(
                f"{key}: {local} has no config.json; set {key} to a directory saved with save_pretrained (config.json, weights, tokenizer files)"
            )
        return
    if _looks_like_path(path):
        raise ModelCheckError(f"{key}: directory {local} does not exist; set {key} to an existing model directory, a .gguf file or a hub id")
    if not _hub_downloads_allowed():
        raise ModelCheckError(
            f"{key}: {path!r} is no local directory and, as a hub id, cannot be fetched while HF_HUB_OFFLINE is set; "
            f"fix {key} or set HF_HUB_OFFLINE=0"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def check_model(path: str, *, key: str = "model.path", prompt_format: str = "auto", context_length: int | None = None, device: str | None = None) -> ModelProfile:
    """Everything :mod:`workers.model_profile` promises for ``path``, in the order a user fixes it; the model is loaded once."""
    from transformers import AutoConfig

    from workers.model_files import load_tokenizer
    from workers.runtime import ModelRuntime

    check_source(path, key)
    if not is_gguf_file(path):
        try:
            AutoConfig.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure becomes the one-line error
            raise ModelCheckError(f"{key}: cannot read the model config of {path!r} ({_one_line(exc)}); set {key} to a Hugging Face causal LM") from None
    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelCheckError(
            f"{key}: cannot load the tokenizer of {path!r} ({_one_line(exc)}); save the tokenizer next to the model (tokenizer.json or tokenizer_config.json)"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ModelCheckError(
            f"{key}: the tokenizer of {path!r} has no eos token, so kaizen cannot tell where an answer ends; "
            "set eos_token in its tokenizer_config.json (tokenizer.eos_token = ...; tokenizer.save_pretrained)"
        )
    try:
        runtime = ModelRuntime.load(path, device=device, prompt_format=prompt_format, context_length=context_length)
    except (PromptFormatError, ValueError) as exc:
        raise ModelCheckError(f"{key}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ModelCheckError(f"{key}: cannot load {path!r} as a causal LM ({_one_line(exc)}); set {key} to a Hugging Face causal LM") from None
    try:
        runtime.probe_forward()
    except Exception as exc:  # noqa: BLE001
        raise ModelCheckError(f"{key}: {path!r} loads but fails a forward pass ({_one_line(exc)}); check the checkpoint's weights and config") from None
    return runtime.profile


def check_tokenizers_match(base_path: str, other_path: str, *, key: str) -> None:
    """``other_path`` must tokenise like ``base_path`` (GenARM adds their next-token log-probs id by id)."""
    from workers.genarm import TokenizerMismatchError, check_shared_tokenizer
    from workers.model_files import load_tokenizer

    try:
        check_shared_tokenizer(load_tokenizer(base_path), load_tokenizer(other_path), base_name=base_path, reward_name=other_path)
    except TokenizerMismatchError as exc:
        shown = "; ".join(exc.differences)[:200]
        raise ModelCheckError(
            f"{key}: the tokenizer of {other_path!r} differs from the policy's ({base_path!r}: {shown}); "
            f"set {key} to a model with the policy's tokenizer (e.g. a smaller model of the same family)"
        ) from None
