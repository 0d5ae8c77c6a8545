"""`kaizen init`: data dir, lineage DB at head, the first champion registered."""

from __future__ import annotations

from pathlib import Path

import structlog
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import TINY_MODEL, Settings
from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head

log = structlog.get_logger(__name__)


def resolve_initial_model(settings: Settings) -> tuple[str, str]:
    """Return (path to load, base model name) for the configured model, building tiny if needed."""
    if settings.model.path != TINY_MODEL:
        return settings.model.path, settings.model.path
    target = settings.tiny_model_dir
    if not (target / "config.json").exists():
        from policies.self_instruct import load_seed_prompts
        from workers.tiny_model import build_tiny_model

        build_tiny_model(target, seed=settings.seed, extra_corpus=load_seed_prompts())
        log.info("tiny_model.built", path=str(target))
    return str(target), TINY_MODEL


def open_lineage(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.resolved_database_url))


def initialise(settings: Settings) -> sessionmaker[Session]:
    """Idempotent: safe to run on every daemon start."""
    data_dir: Path = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
    sessions = open_lineage(settings)
    path, base_model = resolve_initial_model(settings)
    with transaction(sessions) as session:
        champion = lineage.register_initial_champion(session, path=path, base_model=base_model, actor="kaizen init")
        log.info("lineage.ready", database=settings.resolved_database_url, champion=champion.id)
    return sessions
