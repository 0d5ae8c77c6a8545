"""Screenshots of the dashboard for the README, taken with Debian's headless Chromium.

    .venv/bin/python -m ops.screenshot_dashboard            # writes ops/screenshots/*.png

Seeds a demo lineage (ops.bench.lineage_seed.seed_lineage, plus a manual promotion and a rollback
through the real lineage functions) in a temporary directory, serves the dashboard on a free
loopback port and photographs the overview and one iteration. Nothing is downloaded: Playwright
drives /usr/bin/chromium (`apt-get install -y chromium` if it is missing).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
OUT_DIR = Path(__file__).parent / "screenshots"


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium under Playwright; never a downloaded browser build."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium chromium-driver`")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_background(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on a free loopback port; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def seed_demo(data_dir: Path, iterations: int = 36) -> Any:
    """A demo lineage with gate decisions, one manual promotion and one rollback; returns Settings."""
    from daemon.config import load_settings
    from daemon.db import lineage
    from daemon.db.engine import make_engine, make_session_factory, transaction, upgrade_to_head
    from daemon.db.models import Checkpoint, CheckpointStatus
    from ops.bench.lineage_seed import seed_lineage

    settings = load_settings(None, data_dir=str(data_dir), dashboard={"token": "demo-token"})
    upgrade_to_head(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    seed_lineage(engine, iterations, 48, seed=3)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        retired = session.query(Checkpoint).filter(Checkpoint.status == CheckpointStatus.retired).order_by(Checkpoint.id).all()
        if len(retired) >= 2:
            lineage.manual_promote(session, retired[-2].id, actor="alice", reason="A/B test in production favoured it")
    with transaction(sessions) as session:
        lineage.rollback(session, actor="bob", reason="users report terser answers; back to the previous champion")
    return settings


def take_screenshots(out_dir: Path = OUT_DIR, width: int = 1400) -> list[Path]:
    from playwright.sync_api import sync_playwright

    from daemon.dashboard import create_dashboard_app

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="kaizen-demo-") as scratch:
        settings = seed_demo(Path(scratch))
        with serve_in_background(create_dashboard_app(settings)) as base, sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
            page.goto(f"{base}/")
            page.wait_for_selector("#lineage-graph .node")
            for name, selector in (("overview", None), ("lineage", "#lineage-graph"), ("charts", ".charts")):
                path = out_dir / f"dashboard-{name}.png"
                if selector is None:
                    page.screenshot(path=str(path), full_page=True)
                else:
                    page.locator(selector).first.screenshot(path=str(path))
                written.append(path)
            last = page.locator("#iterations tbody a").first.inner_text()
            page.goto(f"{base}/iterations/{last}")
            path = out_dir / "dashboard-iteration.png"
            page.screenshot(path=str(path), full_page=True)
            written.append(path)
            browser.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshots of the kaizen dashboard for the README.")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for path in take_screenshots(args.out):
        print(path)


if __name__ == "__main__":
    main()
