"""The production tests leave the machine's shared services alone.

The shared Redis (127.0.0.1:6379) serves other people's work. While another process keeps writing
to every one of its DB numbers, a production test runs in a pytest of its own with the default
harness (no KAIZEN_TEST_* variables); afterwards every key of that process is still there with the
value it last wrote. The old harness FLUSHed a random DB 1-15 of that server at the end of each test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import pytest
import redis

from tests.production.harness import REPO, TEST_DATABASE_ENV, TEST_REDIS_ENV, redis_up

pytestmark = pytest.mark.slow

SHARED_REDIS_PORT = 6379
INNER_TEST = "tests/production/test_celery_redis.py::test_the_same_stage_delivered_twice_to_two_worker_processes_computes_once"


class SharedRedisUser:
    """Another process's work on the shared Redis: a key per DB number, rewritten until stopped."""

    def __init__(self) -> None:
        self.key = f"kaizen-isolation-sentinel-{uuid.uuid4().hex}"
        self.clients = [redis.Redis(port=SHARED_REDIS_PORT, db=n) for n in range(16)]
        self.last_written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)

    def __enter__(self) -> SharedRedisUser:
        self._write_all()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        for client in self.clients:  # only the keys this test created
            client.delete(self.key)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _write_all(self) -> None:
        self.last_written += 1
        for client in self.clients:
            client.set(self.key, self.last_written, ex=3600)

    def _write(self) -> None:
        while not self._stop.wait(0.5):
            self._write_all()

    def missing(self) -> list[int]:
        """The DB numbers where this user's key is gone or holds another value than it last wrote."""
        expected = str(self.last_written).encode()
        return [n for n, client in enumerate(self.clients) if client.get(self.key) != expected]


def test_production_tests_leave_the_shared_redis_dbs_untouched() -> None:
    if not redis_up(SHARED_REDIS_PORT):
        pytest.skip("no shared Redis on 127.0.0.1:6379 to watch")
    env = {k: v for k, v in os.environ.items() if k not in (TEST_REDIS_ENV, TEST_DATABASE_ENV)}
    with SharedRedisUser() as other_user:
        inner = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", INNER_TEST],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        assert inner.returncode == 0, inner.stdout[-4000:] + inner.stderr[-2000:]
        other_user.stop()  # then compare against the values it wrote last
        assert other_user.missing() == []
