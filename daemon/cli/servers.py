"""`kaizen serve` and `kaizen dashboard`: the two HTTP processes."""

from __future__ import annotations

from typing import Annotated

import typer

from daemon.cli.common import ConfigOption, DataDirOption, app, console, fail, ops_sessions, require_lineage_db, settings_from


def _check_reward_models(settings) -> None:  # type: ignore[no-untyped-def]
    """Every configured reward-model path passes the model checks at start, not at a request."""
    from daemon.db import lineage
    from daemon.db.engine import open_lineage
    from workers.model_files import ModelSourceError
    from workers.steering.genarm import check_configured_reward_models

    with open_lineage(settings)() as session:
        champion = lineage.current_champion(session)
        champion_path = champion.path if champion is not None else None
    try:
        check_configured_reward_models(settings, champion_path)
    except ModelSourceError as exc:
        raise fail(str(exc)) from None


@app.command()
def serve(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (serve.port)")] = None,
    steering: Annotated[str | None, typer.Option(help="default steering: none, urial, steerlm or genarm")] = None,
) -> None:
    """Serve the current champion with an OpenAI-compatible API; follows promotions and rollbacks."""
    import uvicorn

    from daemon.serving import build_app

    overrides = {k: v for k, v in {"host": host, "port": port, "default_steering": steering}.items() if v is not None}
    settings = settings_from(config, data_dir, serve=overrides)
    from daemon.http_security import unauthenticated_bind_problem

    problem = unauthenticated_bind_problem(settings.serve.host, settings.serve.api_key, settings.serve.allow_unauthenticated)
    if problem:
        raise fail(problem)
    require_lineage_db(settings)
    _check_reward_models(settings)
    console.print(f"serving the champion of {settings.resolved_data_dir} on http://{settings.serve.host}:{settings.serve.port}/v1")
    uvicorn.run(build_app(settings), host=settings.serve.host, port=settings.serve.port, log_config=None, access_log=False)


@app.command()
def dashboard(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (dashboard.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (dashboard.port)")] = None,
) -> None:
    """The web dashboard: lineage graph, charts, events, promote/rollback (token), /metrics."""
    import uvicorn

    from daemon.dashboard import create_dashboard_app

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = settings_from(config, data_dir, dashboard=overrides) if overrides else settings_from(config, data_dir)
    sessions = ops_sessions(settings)
    where = f"http://{settings.dashboard.host}:{settings.dashboard.port}/"
    token = "promote/rollback enabled (token set)" if settings.dashboard.token else "read-only: set dashboard.token or KAIZEN_DASHBOARD__TOKEN to enable promote/rollback"
    console.print(f"dashboard for {settings.resolved_data_dir} on {where} ({token}); metrics at {where}metrics")
    uvicorn.run(create_dashboard_app(settings, sessions), host=settings.dashboard.host, port=settings.dashboard.port, log_config=None, access_log=False)
