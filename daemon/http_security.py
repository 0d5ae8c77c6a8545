"""What both HTTP servers (the dashboard and the OpenAI-compatible server) do about hostile clients.

* **Host allow-list.** A page on any website can make a browser send requests to a loopback
  server by pointing a DNS name of its own at 127.0.0.1 (DNS rebinding); the request then
  carries that foreign name in its Host header. Only the names in the allow-list are answered:
  by default the loopback names plus the address the server binds, if it is a specific one.
* **Constant-time secret comparison**, so response timing does not reveal how many leading
  characters of a guessed token or API key were right.
* **A small rate limit on failed authentication**: a client address that failed too often in
  the last window is answered 429 until the window has passed, valid secret or not.
* **The bind rule**: a server without an API key refuses to listen on a non-loopback address
  unless the operator said it may serve anyone (``serve.allow_unauthenticated``).
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request

__all__ = [
    "LOOPBACK_HOSTS",
    "FailureLimiter",
    "TrustedHostMiddleware",
    "allowed_hosts",
    "bearer_token",
    "client_address",
    "is_loopback",
    "secret_matches",
    "unauthenticated_bind_problem",
]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(configured: Sequence[str] | None, bind_host: str) -> list[str]:
    """The Host header values a server answers: the configured list, or loopback plus the bind address."""
    if configured is not None:
        return list(configured)
    hosts = list(LOOPBACK_HOSTS)
    if bind_host not in WILDCARD_BINDS and not is_loopback(bind_host):
        hosts.append(f"[{bind_host}]" if ":" in bind_host else bind_host)
    return hosts


def secret_matches(presented: str, configured: SecretStr | None) -> bool:
    """True when ``presented`` equals the configured secret, compared in constant time."""
    if configured is None or not configured.get_secret_value():
        return False
    return hmac.compare_digest(presented.encode("utf-8"), configured.get_secret_value().encode("utf-8"))


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def unauthenticated_bind_problem(host: str, api_key: SecretStr | None, allow_unauthenticated: bool) -> str | None:
    """Why the server must not bind ``host`` as configured, or None."""
    if is_loopback(host) or allow_unauthenticated or (api_key is not None and api_key.get_secret_value()):
        return None
    return (
        f"refusing to serve on {host} without an API key: anyone who can reach it could use the model. "
        "Set serve.api_key (or KAIZEN_SERVE__API_KEY), or set serve.allow_unauthenticated: true if that is intended"
    )


class FailureLimiter:
    """At most ``max_failures`` failed authentications per client address in ``window_seconds``."""

    def __init__(self, max_failures: int = 10, window_seconds: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures[client]
        while times and now - times[0] > self.window_seconds:
            times.popleft()
        return times

    def blocked_for(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return 0.0
            return max(0.0, self.window_seconds - (now - times[0]))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:  # bound the memory a flood of addresses can take
                for stale in [c for c, t in self._failures.items() if not t]:
                    del self._failures[stale]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
