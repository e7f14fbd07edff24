"""The rating page: a Starlette app, server-rendered HTML, its CSS and JS served from the package.

A rater logs in with the token `upbeat feedback add-rater NAME` printed; the page shows one pair
at a time (the store says which) and takes one of five answers. The same endpoints answer JSON
to a client that asks for it (`Accept: application/json`), which is how the simulated rater and
the load benchmark vote: exactly the browser's path, login, CSRF token and all.

Security:
- session: the token itself in an HttpOnly, SameSite=Strict cookie; the server stores only its
  hash and looks the rater up on every request (no server-side session to lose on a restart);
- CSRF: every form carries a token; after login it is HMAC(rater token, purpose), which only a
  holder of the cookie can compute; the login form uses a double-submit cookie. A request whose
  `Origin` names another host is refused as well;
- escaping: Jinja2 autoescape on every template; a Content-Security-Policy allows scripts and
  styles from this server only, so even an unescaped string could not run;
- votes: validated by the store (unknown pair 404, not shown to you 403, answered already 409);
- rate limit: a token bucket per rater on votes (429 with Retry-After).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from upbeat.feedback.store import CHOICES, Rater, Store, VoteRefused

HERE = Path(__file__).parent
SESSION_COOKIE = "upbeat_rater"
LOGIN_COOKIE = "upbeat_login_csrf"
MAX_FORM_BYTES = 4096  # a vote or a login is a few dozen bytes
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class RateLimiter:
    """A token bucket per key: `burst` at once, then `per_minute` on average."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: int, now: float | None = None) -> float:
        """0 if allowed (and counted), else the seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")


def csrf_for(token: str) -> str:
    """The form token of a logged-in rater: derived from their secret, so no state to keep."""
    return hmac.new(token.encode(), b"upbeat-feedback-form", "sha256").hexdigest()


def create_app(store: Store, *, votes_per_minute: float = 60, burst: int = 10) -> Starlette:
    """The rating page over `store`; votes limited per rater to `votes_per_minute` (`burst` at
    once)."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    limiter = RateLimiter(votes_per_minute, burst)

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    def render(name: str, code: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(**context)
        return HTMLResponse(html, status_code=code, headers=SECURITY_HEADERS)

    def refuse(request: Request, status: int, message: str, **extra: Any) -> Response:
        headers = {k: str(v) for k, v in extra.items()}
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=status, headers=headers)
        page = render("error.html", status, status=status, message=message)
        page.headers.update(headers)
        return page

    async def form(request: Request) -> dict[str, str] | None:
        """The urlencoded form, one value per field; None if too large or not a form."""
        if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
            return None
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return None
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key: values[0] for key, values in fields.items()}

    def foreign_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        return bool(origin) and origin != "null" and urlsplit(origin).netloc != request.url.netloc

    async def current(request: Request) -> tuple[Rater, str] | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        rater = await run_in_threadpool(store.rater, token)
        return (rater, token) if rater else None

    async def login_page(request: Request) -> Response:
        login_csrf = secrets.token_urlsafe(24)
        page = render("login.html", login_csrf=login_csrf)
        page.set_cookie(LOGIN_COOKIE, login_csrf, httponly=True, samesite="strict")
        return page

    async def login(request: Request) -> Response:
        fields = await form(request)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if (
            fields is None
            or foreign_origin(request)
            or not expected
            or not hmac.compare_digest(fields.get("csrf", ""), expected)
        ):
            return refuse(request, 403, "the login form expired or came from elsewhere: reload")
        token = fields.get("token", "").strip()
        if not token or await run_in_threadpool(store.rater, token) is None:
            login_csrf = secrets.token_urlsafe(24)
            page = render("login.html", 401, login_csrf=login_csrf, error="unknown token")
            page.set_cookie(LOGIN_COOKIE, login_csrf, httponly=True, samesite="strict")
            return page
        done = RedirectResponse("/", status_code=303)
        done.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict")
        done.delete_cookie(LOGIN_COOKIE)
        return done

    async def logout(request: Request) -> Response:
        me = await current(request)
        fields = await form(request) or {}
        if me and hmac.compare_digest(fields.get("csrf", ""), csrf_for(me[1])):
            done = RedirectResponse("/login", status_code=303)
            done.delete_cookie(SESSION_COOKIE)
            return done
        return refuse(request, 403, "log out from the page's own button")

    async def rate(request: Request) -> Response:
        me = await current(request)
        if me is None:
            if wants_json(request):
                return refuse(request, 401, "log in first")
            return RedirectResponse("/login", status_code=303)
        rater, token = me
        pair = await run_in_threadpool(store.next_pair, rater.id)
        rated = await run_in_threadpool(store.rated, rater.id)
        if wants_json(request):
            return JSONResponse(
                {"pair": asdict(pair) if pair else None, "csrf": csrf_for(token), "rated": rated},
                headers={"Cache-Control": "no-store"},
            )
        saved = request.query_params.get("saved", "")
        return render(
            "rate.html",
            rater=rater.name,
            rated=rated,
            csrf=csrf_for(token),
            pair=pair,
            saved=saved if saved.isdigit() else "",
        )

    async def vote(request: Request) -> Response:
        me = await current(request)
        if me is None:
            return refuse(request, 401, "log in first: your session is missing or unknown")
        rater, token = me
        fields = await form(request)
        if fields is None or foreign_origin(request):
            return refuse(request, 400, "a vote is a form posted by the rating page")
        if not hmac.compare_digest(fields.get("csrf", ""), csrf_for(token)):
            return refuse(request, 403, "the form's CSRF token is wrong: reload the page")
        pair_id, choice = fields.get("pair", ""), fields.get("choice", "")
        if not pair_id.isdigit() or len(pair_id) > 12:
            return refuse(request, 400, f"pair must be a pair number, not {pair_id!r}")
        if choice not in CHOICES:
            return refuse(request, 400, f"unknown answer {choice!r}: one of {', '.join(CHOICES)}")
        if wait := limiter.take(rater.id):
            return refuse(
                request,
                429,
                f"too many votes: wait {wait:.0f} s and answer again",
                **{"Retry-After": max(1, round(wait))},
            )
        try:
            vote_id = await run_in_threadpool(store.vote, rater.id, int(pair_id), choice)
        except VoteRefused as exc:
            return refuse(request, exc.status, str(exc))
        if wants_json(request):
            return JSONResponse({"vote": vote_id, "pair": int(pair_id), "choice": choice})
        return RedirectResponse(f"/?saved={int(pair_id)}", status_code=303)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/", rate, methods=["GET"]),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/vote", vote, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]
    )


def serve(store: Store, host: str, port: int, **limits: Any) -> None:
    """Serve the page until interrupted (one process: the rate limiter lives in it)."""
    import uvicorn

    uvicorn.run(create_app(store, **limits), host=host, port=port, log_level="warning")
