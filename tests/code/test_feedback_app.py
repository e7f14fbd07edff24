"""The rating page over HTTP (Starlette's TestClient): login, CSRF, escaping, votes refused,
the rate limit, and the JSON answers the simulated rater uses."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from upbeat.feedback.app import RateLimiter, create_app, csrf_for
from upbeat.feedback.store import Store

EVIL = '<script>alert("x")</script> & <b>bold</b>'


def pair_row(i: int, prompt: str = "", priority: float = 0.0) -> dict:
    return dict(
        prompt=prompt or f"prompt {i}",
        text_a=f" a{i}",
        text_b=f" b{i}",
        model_a="models:/upbeat-policy/1",
        model_b="models:/upbeat-policy/1",
        seed=i,
        priority=priority,
    )


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'f.db'}")
    yield s
    s.close()


def client_for(store: Store, **limits) -> TestClient:
    return TestClient(create_app(store, **limits), base_url="http://127.0.0.1:8765")


def login(client: TestClient, token: str) -> None:
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    done = client.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False)
    assert done.status_code == 303, done.text


def form_csrf(html: str) -> str:
    return re.search(r'id="vote">\s*<input type="hidden" name="csrf" value="([^"]+)"', html).group(
        1
    )


def test_login_rate_and_count(store):
    token = store.add_rater("ann")
    ids = store.add_pairs([pair_row(1), pair_row(2)])
    with client_for(store) as client:
        assert client.get("/", follow_redirects=False).headers["location"] == "/login"
        login(client, token)
        page = client.get("/")
        assert "more positive while still making sense" in page.text
        assert (
            f'name="pair" value="{ids[0]}"' in page.text and 'rated <span id="rated">0' in page.text
        )
        done = client.post(
            "/vote",
            data={"csrf": form_csrf(page.text), "pair": ids[0], "choice": "b"},
            follow_redirects=False,
        )
        assert done.status_code == 303 and done.headers["location"] == f"/?saved={ids[0]}"
        page = client.get(done.headers["location"])
        assert f"pair {ids[0]}" in page.text and 'rated <span id="rated">1' in page.text
        assert f'name="pair" value="{ids[1]}"' in page.text
    assert [(r["pair_id"], r["choice"]) for r in store.export()] == [(ids[0], "b")]


def test_a_script_in_a_tweet_shows_as_text(store):
    token = store.add_rater("ann")
    store.add_pairs([{**pair_row(1, prompt=EVIL), "text_b": EVIL}])
    with client_for(store) as client:
        login(client, token)
        page = client.get("/")
    assert "<script>alert" not in page.text and "<b>bold" not in page.text
    assert (
        "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page.text
    )
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_page_assets_are_served_by_the_page_itself(store):
    token = store.add_rater("ann")
    with client_for(store) as client:
        login(client, token)
        page = client.get("/")
        for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert asset.startswith("/"), f"{asset}: an asset from elsewhere"
            if asset.startswith("/static/"):
                assert client.get(asset).status_code == 200
    assert "Nothing left to rate" in page.text


def test_forms_without_their_csrf_token_are_refused(store):
    token = store.add_rater("ann")
    (pid,) = store.add_pairs([pair_row(1)])
    with client_for(store) as client:
        bad_login = client.post("/login", data={"csrf": "x", "token": token})
        assert bad_login.status_code == 403 and "expired" in bad_login.text
        login(client, token)
        client.get("/")
        for csrf in ("", "0" * 64):
            done = client.post("/vote", data={"csrf": csrf, "pair": pid, "choice": "a"})
            assert done.status_code == 403 and "CSRF" in done.text
        elsewhere = client.post(
            "/vote",
            data={"csrf": csrf_for(token), "pair": pid, "choice": "a"},
            headers={"Origin": "http://evil.example"},
        )
        assert elsewhere.status_code == 400
    assert store.counts()["votes"] == 0


def test_wrong_votes_are_refused_with_a_clear_message(store):
    ann, bob = store.add_rater("ann"), store.add_rater("bob")
    first, second = store.add_pairs([pair_row(1, priority=1), pair_row(2)])
    with client_for(store) as client:
        login(client, ann)
        client.get("/")  # shows `first`

        def vote(pair, choice="a"):
            return client.post(
                "/vote", data={"csrf": csrf_for(ann), "pair": pair, "choice": choice}
            )

        assert (r := vote(999)).status_code == 404 and "there is no pair 999" in r.text
        assert (r := vote(second)).status_code == 403 and "was not shown to you" in r.text
        assert (r := vote(first, "maybe")).status_code == 400 and "unknown answer" in r.text
        assert (r := vote("1 OR 1=1")).status_code == 400 and "pair number" in r.text
        assert vote(first).status_code == 200  # redirected to the next pair
        assert (r := vote(first, "b")).status_code == 409 and "already answered" in r.text
        client.cookies.clear()
        assert vote(second).status_code == 401
        login(client, bob)  # bob was shown nothing yet
        r = client.post("/vote", data={"csrf": csrf_for(bob), "pair": first, "choice": "a"})
        assert r.status_code == 403
    assert [(r["rater"], r["choice"]) for r in store.export()] == [("ann", "a")]


def test_unknown_token_cannot_log_in(store):
    store.add_rater("ann")
    with client_for(store) as client:
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        done = client.post("/login", data={"csrf": csrf, "token": "guess"})
        assert done.status_code == 401 and "unknown token" in done.text
        assert client.get("/", headers={"Accept": "application/json"}).status_code == 401


def test_votes_beyond_the_rate_limit_wait(store):
    token = store.add_rater("ann")
    store.add_pairs([pair_row(i) for i in range(5)])
    with client_for(store, votes_per_minute=6, burst=3) as client:
        login(client, token)
        codes = []
        for _ in range(4):
            pair = client.get("/", headers={"Accept": "application/json"}).json()["pair"]
            r = client.post(
                "/vote",
                data={"csrf": csrf_for(token), "pair": pair["id"], "choice": "tie"},
                headers={"Accept": "application/json"},
            )
            codes.append(r.status_code)
        assert codes == [200, 200, 200, 429]
        assert r.json()["error"].startswith("too many votes") and int(r.headers["retry-after"]) >= 1
    assert store.counts()["votes"] == 3


def test_rate_limiter_refills_at_its_rate():
    limiter = RateLimiter(per_minute=60, burst=2)
    assert [limiter.take(1, now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert limiter.take(1, now=0.0) == pytest.approx(1.0)
    assert limiter.take(2, now=0.0) == 0.0  # per rater
    assert limiter.take(1, now=1.0) == 0.0


def test_json_answers_for_programmatic_raters(store):
    token = store.add_rater("ann")
    (pid,) = store.add_pairs([pair_row(1)])
    with client_for(store) as client:
        login(client, token)
        got = client.get("/", headers={"Accept": "application/json"}).json()
        assert got["pair"]["id"] == pid and got["rated"] == 0 and got["csrf"] == csrf_for(token)
        r = client.post(
            "/vote",
            data={"csrf": got["csrf"], "pair": pid, "choice": "both_bad"},
            headers={"Accept": "application/json"},
        )
        assert r.json() == {"vote": 1, "pair": pid, "choice": "both_bad"}
        assert client.get("/", headers={"Accept": "application/json"}).json()["pair"] is None
