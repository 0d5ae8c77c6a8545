"""The embedded broker: kombu's SQLAlchemy transport over an SQLite file, tuned for one host.

kombu's stock transport polls once a second and passes every transport option to
``create_engine``; with six stages per cycle that polling was a large share of a tiny cycle.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy

EMBEDDED_TRANSPORT = "kaizen-sqlite"
POLL_SECONDS = 0.05


class Transport(kombu_sqlalchemy.Transport):
    polling_interval = POLL_SECONDS


def embedded_broker_url(db_path: str) -> str:
    return f"{EMBEDDED_TRANSPORT}+sqlite:///{db_path}"


TRANSPORT_ALIASES.setdefault(EMBEDDED_TRANSPORT, f"{__name__}:Transport")
