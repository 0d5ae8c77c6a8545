"""A Celery app for `celery -A tests.production.crashing_worker:app worker`: the real kaizen
worker, except that the stage named by KAIZEN_TEST_CRASH_STAGE SIGKILLs its own pool process the
moment it starts, as the kernel's OOM killer would. Nothing is recorded on the stage row: the
process is gone before it could."""

from __future__ import annotations

import os
import signal
from typing import Any

from daemon import stage_specs
from workers import celery_app

CRASH_STAGE = os.environ["KAIZEN_TEST_CRASH_STAGE"]
_real_stage_function = stage_specs.stage_function


def _killed(_ctx: Any) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


def _stage_function(name: str) -> Any:
    return _killed if name == CRASH_STAGE else _real_stage_function(name)


# The task looks the function up at each delivery (`from daemon.stage_specs import stage_function`).
stage_specs.stage_function = _stage_function
app = celery_app.app
