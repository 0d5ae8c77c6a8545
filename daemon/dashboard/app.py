"""The operator dashboard: lineage graph, per-iteration charts, events, guarded manual actions.

Server-rendered HTML (Jinja2) with inline SVG; a few lines of vanilla JS in static/ only select
a checkpoint when its node is clicked. Reads use the same view functions as the CLI
(daemon.views); actions use the same lineage functions as `kaizen promote/rollback/pause/resume`
and are audited the same way, with actor ``dashboard@<client address>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from daemon import http_security, metrics, views
from daemon.config import Settings
from daemon.dashboard import pages
from daemon.db import lineage
from daemon.db.engine import dry_run, transaction
from daemon.db.models import Event

log = structlog.get_logger(__name__)

HERE = Path(__file__).parent
MAX_FORM_BYTES = 16 * 1024
NO_TOKEN_MESSAGE = (
    "manual actions are disabled: no dashboard token is configured. Set dashboard.token in kaizen.yaml "
    "or the KAIZEN_DASHBOARD__TOKEN environment variable, then restart the dashboard"
)


class ActionRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form (what the dashboard's own forms send) or a JSON object."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ActionRefused(413, "request body too large")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        import json

        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise ActionRefused(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ActionRefused(400, "expected a JSON object")
        return {str(k): str(v) for k, v in data.items() if v is not None}
    if content_type and not content_type.startswith("application/x-www-form-urlencoded"):
        raise ActionRefused(415, "send application/x-www-form-urlencoded or application/json")
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _presented_token(request: Request, form: dict[str, str]) -> str:
    return http_security.bearer_token(request) or form.get("token", "").strip()


def _check_token(settings: Settings, request: Request, form: dict[str, str], limiter: http_security.FailureLimiter) -> None:
    if settings.dashboard.token is None or not settings.dashboard.token.get_secret_value():
        raise ActionRefused(403, NO_TOKEN_MESSAGE)
    client = http_security.client_address(request)
    wait = limiter.blocked_for(client)
    if wait:
        raise ActionRefused(429, f"too many wrong tokens from {client}: nothing was changed; try again in {wait:.0f}s")
    presented = _presented_token(request, form)
    if not presented:
        raise ActionRefused(401, "a token is required: enter the dashboard token (dashboard.token) to promote, roll back, pause or resume")
    if not http_security.secret_matches(presented, settings.dashboard.token):
        limiter.failed(client)
        raise ActionRefused(401, "wrong token: nothing was changed")


def _actor(request: Request) -> str:
    host = request.client.host if request.client else "unknown"
    return f"dashboard@{host}"


def _reason(form: dict[str, str]) -> str | None:
    return form.get("reason", "").strip() or None


Action = Callable[[Session, str, dict[str, str]], str]


def _promote(session: Session, actor: str, form: dict[str, str]) -> str:
    checkpoint = form.get("checkpoint", "").strip()
    if not checkpoint:
        raise lineage.LineageError("choose a checkpoint to promote")
    target, previous = lineage.manual_promote(session, checkpoint, actor=actor, reason=_reason(form))
    return f"promoted {target.id} (was {previous})"


def _rollback(session: Session, actor: str, form: dict[str, str]) -> str:
    restored, replaced = lineage.rollback(session, actor=actor, reason=_reason(form), to=form.get("to", "").strip() or None)
    return f"rolled back from {replaced} to {restored.id}"


def _pause(session: Session, actor: str, form: dict[str, str]) -> str:
    changed = lineage.set_paused(session, True, actor=actor, reason=_reason(form))
    return "paused: no cycle will start or resume" if changed else "already paused"


def _resume(session: Session, actor: str, form: dict[str, str]) -> str:
    changed = lineage.set_paused(session, False, actor=actor, reason=_reason(form))
    return "resumed" if changed else "was not paused"


ACTIONS: dict[str, Action] = {"promote": _promote, "rollback": _rollback, "pause": _pause, "resume": _resume}
# The checkpoint an action makes champion, hashed against its manifest before the action runs.
TRUSTED_TARGETS: dict[str, Callable[[Session, dict[str, str]], str | None]] = {
    "promote": lambda _session, form: form.get("checkpoint", "").strip() or None,
    "rollback": lambda session, form: form.get("to", "").strip() or lineage.rollback_target(session),
}


def _verify_target(settings: Settings, sessions: sessionmaker[Session], name: str, form: dict[str, str]) -> None:
    from workers.checkpoints import CheckpointError
    from workers.trust import verify_target

    target_of = TRUSTED_TARGETS[name]
    try:
        verify_target(settings, sessions, lambda session: target_of(session, form))
    except CheckpointError as exc:
        raise ActionRefused(409, str(exc)) from None


def create_dashboard_app(settings: Settings, sessions: sessionmaker[Session] | None = None) -> FastAPI:
    """The dashboard as an ASGI app; the serving process may mount it (``app.mount("/ops", ...)``)."""
    if sessions is None:
        from daemon.db.engine import open_lineage

        sessions = open_lineage(settings)
    app = FastAPI(title="kaizen dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        http_security.TrustedHostMiddleware, allowed_hosts=http_security.allowed_hosts(settings.dashboard.allowed_hosts, settings.dashboard.host)
    )
    limiter = http_security.FailureLimiter()

    @app.middleware("http")
    async def _no_framing(request: Request, call_next):  # type: ignore[no-untyped-def]
        # The action buttons must not be clickable through another site's invisible frame.
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    app.state.settings = settings
    app.state.sessions = sessions
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    registry = metrics.lineage_registry(sessions)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    token_configured = settings.dashboard.token is not None and bool(settings.dashboard.token.get_secret_value())

    def read(fn: Callable[[Session], Any]) -> Any:
        with sessions() as session:
            return fn(session)

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, n: int = 50, done: int | None = None, unchanged: str | None = None) -> HTMLResponse:
        n = max(1, min(n, 500))
        context = read(lambda s: pages.overview_context(s, settings, n, done, unchanged if unchanged in ACTIONS else None))
        return templates.TemplateResponse(request, "index.html", context | {"token_configured": token_configured, "no_token_message": NO_TOKEN_MESSAGE})

    @app.get("/iterations/{iteration_id}", response_class=HTMLResponse)
    def iteration_page(request: Request, iteration_id: int) -> HTMLResponse:
        try:
            context = read(lambda s: pages.iteration_context(s, iteration_id))
        except views.NotFound as exc:
            return templates.TemplateResponse(request, "message.html", {"title": "not found", "message": str(exc)}, status_code=404)
        return templates.TemplateResponse(request, "iteration.html", context)

    @app.get("/api/status")
    def api_status() -> dict[str, Any]:
        return read(views.status_view)

    @app.get("/api/lineage")
    def api_lineage(limit: int = 60) -> dict[str, Any]:
        return read(lambda s: views.lineage_graph(s, max(1, min(limit, 5000))))

    @app.get("/api/iterations")
    def api_iterations(limit: int = 50) -> list[dict[str, Any]]:
        return read(lambda s: views.recent_iterations(s, max(1, min(limit, 1000))))

    @app.get("/api/iterations/{iteration_id}")
    def api_iteration(iteration_id: int) -> dict[str, Any]:
        try:
            return read(lambda s: views.iteration_detail(s, iteration_id))
        except views.NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/events")
    def api_events(limit: int = 50) -> list[dict[str, Any]]:
        return read(lambda s: views.recent_events(s, max(1, min(limit, 1000))))

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        body, content_type = metrics.render(registry)
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/actions/{name}")
    async def action(request: Request, name: str) -> Response:
        perform = ACTIONS.get(name)
        if perform is None:
            raise HTTPException(404, f"unknown action {name!r}; one of: {', '.join(ACTIONS)}")
        actor = _actor(request)
        try:
            form = await _form(request)
            _check_token(settings, request, form, limiter)
            if name in TRUSTED_TARGETS:
                dry_run(sessions, lambda session: perform(session, actor, form))  # the lineage's cheap refusals first
                _verify_target(settings, sessions, name, form)
            with transaction(sessions) as session:
                before = _latest_event_id(session, actor)
                message = perform(session, actor, form)
                session.flush()
                after = _latest_event_id(session, actor)
        except ActionRefused as exc:
            log.warning("dashboard.action_refused", action=name, actor=actor, status=exc.status, reason=exc.message)
            return _refusal(request, templates, exc.status, exc.message)
        except lineage.LineageError as exc:
            log.warning("dashboard.action_refused", action=name, actor=actor, status=409, reason=str(exc))
            return _refusal(request, templates, 409, str(exc))
        log.info("dashboard.action", action=name, actor=actor, result=message)
        if name in TRUSTED_TARGETS and "mlflow" in settings.tracking.backends:
            from workers.tracking import mirror_registry

            # The champion alias moves in the same step; a mirror failure is a warning event, never a refusal.
            mirror = mirror_registry(settings, sessions, actor=actor)
            message = f"{message}; registry: {mirror or 'mirror failed, `kaizen registry sync` retries'}"
        event_id = after if after != before else None  # None: the action changed nothing (already paused)
        if _wants_json(request):
            return JSONResponse({"ok": True, "message": message, "event": event_id})
        return RedirectResponse(f"/?done={event_id}" if event_id else f"/?unchanged={name}", status_code=303)

    return app


def _latest_event_id(session: Session, actor: str) -> int | None:
    return session.scalar(select(func.max(Event.id)).where(Event.actor == actor))


def _refusal(request: Request, templates: Jinja2Templates, status: int, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="kaizen dashboard"'} if status == 401 else None
    if _wants_json(request):
        return JSONResponse({"ok": False, "error": message}, status_code=status, headers=headers)
    return templates.TemplateResponse(
        request, "message.html", {"title": "refused", "message": message, "status": status}, status_code=status, headers=headers
    )
