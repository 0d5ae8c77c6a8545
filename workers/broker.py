"""The embedded broker: kombu's SQLAlchemy transport over an SQLite file, tuned for one host.

kombu's stock transport polls once a second and passes every transport option to
``create_engine``; with six stages per cycle that polling was a large share of a tiny cycle.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from daemon.config import EMBEDDED_TRANSPORT

POLL_SECONDS = 0.05


class Transport(kombu_sqlalchemy.Transport):
    polling_interval = POLL_SECONDS


TRANSPORT_ALIASES.setdefault(EMBEDDED_TRANSPORT, f"{__name__}:Transport")
