"""A screenshot of a kaizen iteration run in the MLflow UI, for the README.

    python -m ops.screenshot_mlflow --mlruns <data_dir>/mlruns --mlflow <venv>/bin/mlflow

The UI needs the full ``mlflow`` package (``mlflow-skinny``, kaizen's tracking extra, has no
server): pass its ``mlflow`` executable. Serves the store on a free loopback port and
photographs the newest kaizen run's page with Debian's headless Chromium (ops.screenshot_dashboard).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from ops.screenshot_dashboard import OUT_DIR, free_port, launch_chromium


def _wait_until_up(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the MLflow server at {url} did not come up in {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mlruns", type=Path, required=True)
    parser.add_argument("--mlflow", default="mlflow")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "mlflow-run.png")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    uri = args.mlruns.resolve().as_uri()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kaizen")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    port = free_port()
    server = subprocess.Popen(
        [args.mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true"),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{base}/health")
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}", wait_until="networkidle")
            page.wait_for_timeout(3000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(args.out)


if __name__ == "__main__":
    main()
