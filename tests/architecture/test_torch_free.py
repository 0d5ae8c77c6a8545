"""The ops side never loads the model-holding side: status, views, dashboard and /metrics start in
a second, not in the ~20 s torch takes to import. (The import-linter contracts in pyproject.toml
check the import graph; this checks what a real process has loaded.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from daemon.db import lineage
from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")

PROBE = textwrap.dedent(
    """
    import json, sys
    {body}
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
    model_side = sorted(m for m in sys.modules if m.startswith(("workers.runtime", "workers.generation", "workers.scoring", "workers.model_files", "workers.stages", "workers.genarm", "workers.training")))
    print(json.dumps({{"heavy": heavy[:5], "model_side": model_side, **result}}))
    """
)


def _probe(body: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")} | {"PYTHONPATH": str(REPO)}
    code = PROBE.format(body=textwrap.dedent(body), heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lineage_with_a_champion(data_dir: Path) -> None:
    url = f"sqlite:///{data_dir / 'lineage.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with transaction(make_session_factory(engine)) as session:
        lineage.register_initial_champion(session, path=str(data_dir / "models" / "m"), base_model="m", actor="test")
    engine.dispose()


def test_views_dashboard_and_metrics_modules_import_without_torch(tmp_path: Path) -> None:
    out = _probe(
        """
        import daemon.views, daemon.dashboard, daemon.metrics, daemon.stage_specs, daemon.cycle, daemon.scheduler
        result = {}
        """,
        tmp_path,
    )
    assert out["heavy"] == [] and out["model_side"] == []


def test_kaizen_status_and_a_dashboard_page_leave_torch_unloaded(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _lineage_with_a_champion(data_dir)
    out = _probe(
        f"""
        from fastapi.testclient import TestClient
        from typer.testing import CliRunner
        from daemon.cli import app
        from daemon.config import load_settings
        from daemon.dashboard import create_dashboard_app

        status = CliRunner().invoke(app, ["status", "--data-dir", {str(data_dir)!r}])
        client = TestClient(create_dashboard_app(load_settings(None, data_dir={str(data_dir)!r})), base_url="http://127.0.0.1")
        page, metrics = client.get("/"), client.get("/metrics")
        result = {{"status": [status.exit_code, status.output], "page": page.status_code, "metrics": metrics.status_code}}
        """,
        tmp_path,
    )
    assert out["status"][0] == 0 and "champion: ckpt-0000" in out["status"][1], out["status"]
    assert (out["page"], out["metrics"]) == (200, 200)
    assert out["heavy"] == [] and out["model_side"] == []
