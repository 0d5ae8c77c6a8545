"""Integrity at start: an embedded (SQLite) lineage DB is checked before anything reads or writes it.

One flipped byte once let `kaizen run` complete a whole cycle on a DB that ``PRAGMA quick_check``
reported as malformed; a truncated one gave raw "database disk image is malformed" tracebacks.
`kaizen run`, `status` and `serve` now run the check (cheap: it skips the index cross-checks of
``integrity_check``) and a damaged lineage DB stops them with one line saying how to restore it,
having written nothing. The embedded broker DB holds nothing the lineage does not (the daemon
sends again any stage no worker holds), so a damaged one is moved aside and recreated.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import structlog
from sqlalchemy.engine import make_url

log = structlog.get_logger(__name__)

SIDE_FILES = ("-wal", "-shm")


class DamagedDatabase(Exception):
    """The lineage DB fails its integrity check; the message says how to restore it."""


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (``sqlite:///...`` or a kombu ``...+sqlite:///...``), None for anything else."""
    try:
        parsed = make_url(url.split("+", 1)[1] if url.startswith(("sqla+", "kaizen-sqlite+")) else url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy knows: not ours to check
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser()


def quick_check(path: Path) -> str | None:
    """None when ``path`` passes ``PRAGMA quick_check``; else what SQLite reported."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = [row[0] for row in connection.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        connection.close()
    return None if rows == ["ok"] else "; ".join(str(r) for r in rows[:3])


def check_lineage_db(url: str) -> None:
    """Raise DamagedDatabase if the embedded lineage DB at ``url`` exists and is damaged."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return
    problem = quick_check(path)
    if problem is not None:
        raise DamagedDatabase(
            f"the lineage DB {path} is damaged (PRAGMA quick_check: {problem}); nothing was written. "
            f"Stop every kaizen process, restore {path.name} from your backup (and delete {path.name}-wal and "
            f"{path.name}-shm next to it), then start again; `kaizen init` would start a new lineage, not repair this one"
        )


def renew_damaged_broker_db(url: str) -> Path | None:
    """Move a damaged embedded broker DB (and its WAL files) aside so kombu recreates it; where it went, or None."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return None
    problem = quick_check(path)
    if problem is None:
        return None
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(aside)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    log.warning("broker.recreated", damaged=str(aside), problem=problem,
                reason="the embedded broker holds nothing the lineage does not; unfinished stages are sent again")
    return aside
