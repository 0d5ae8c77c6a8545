"""The Celery worker's parent process must not load torch: it forks the model-holding pool
process, and a CUDA context created before a fork is unusable in the child. The end-to-end test
(test_celery_redis.py) checks a running worker's memory maps; this one guards the imports fast."""

from __future__ import annotations

import subprocess
import sys

from tests.production.harness import REPO

PARENT_IMPORTS = """
import sys
import workers.celery_app  # what `celery -A workers.celery_app:app worker` imports in the parent
from workers.celery_app import app
app.loader.import_default_modules()
heavy = sorted(m for m in ("torch", "transformers", "trl", "peft") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_importing_the_celery_app_loads_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PARENT_IMPORTS], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "none", out.stdout + out.stderr
