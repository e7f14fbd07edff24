"""A rater as a program: the browser's own endpoints (login form, CSRF token, vote form), with
JSON answers. The load benchmark's raters, the kill test's, and a simulated rater's."""

from __future__ import annotations

import re
from typing import Any

import httpx

from upbeat.errors import UpbeatError

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class RaterClient:
    """One logged-in rater session against the page at `url`."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.http = httpx.Client(base_url=url, timeout=timeout)
        self.csrf = ""
        page = self.http.get("/login")
        login_csrf = _CSRF.search(page.text)
        if login_csrf is None:
            raise UpbeatError(f"{url}/login has no login form")
        done = self.http.post("/login", data={"csrf": login_csrf.group(1), "token": token})
        if done.status_code != 303:
            raise UpbeatError(f"login refused ({done.status_code})")

    def next_pair(self) -> dict[str, Any] | None:
        """The pair the page shows now (prompt, text_a, text_b, id), or None when none is left."""
        got = self.http.get("/", headers={"Accept": "application/json"})
        got.raise_for_status()
        body = got.json()
        self.csrf = body["csrf"]
        return body["pair"]

    def vote(self, pair_id: int, choice: str) -> httpx.Response:
        """Post the vote form; the response says 200 (recorded) or why not (its `error`)."""
        return self.http.post(
            "/vote",
            data={"csrf": self.csrf, "pair": str(pair_id), "choice": choice},
            headers={"Accept": "application/json"},
        )

    def close(self) -> None:
        self.http.close()
