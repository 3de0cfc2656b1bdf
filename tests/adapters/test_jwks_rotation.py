"""The JWKS is refreshed periodically (issue #15, item 5): a ``kid`` removed at the issuer is
refused within one refresh, even for a token the verifier had cached; the issuer's
``Cache-Control: max-age`` sets the interval within the configured bounds; a failed refresh
keeps the last good keys for a bounded time, then every token is refused; a JWKS file is
re-read when it changes. Real HTTPS on the loopback, real ES256 signatures."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keybroker.adapters.tokens import JwksKeys, TokenVerifier, cache_lifetime
from keybroker.devenv import DevEnv
from keybroker.errors import AuthenticationError, ConfigurationError
from tests.adapters.test_jwks_redirects import serve, server_tls
from tests.adapters.test_tokens import FakeMonotonic, Issuer, settings
from tests.conftest import load_settings


class IssuerSite:
    """The issuer's JWKS over https: what it publishes, the headers it sends, every fetch."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        self.headers: dict[str, str] = {"cache-control": "max-age=1"}
        self.status = 200
        self.fetches: list[float] = []
        self._lock = threading.Lock()

    def route(self, _path: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.fetches.append(time.monotonic())
            body = json.dumps(self.issuer.jwks()).encode()
            return self.status, {"content-type": "application/json", **self.headers}, body


@pytest.fixture
def site(devenv: DevEnv) -> Iterator[tuple[IssuerSite, str]]:
    issuer = Issuer()
    issuer.add_key("old")
    issuer.add_key("new")
    site = IssuerSite(issuer)
    with serve(site.route, server_tls(devenv)) as port:
        yield site, f"https://127.0.0.1:{port}/jwks.json"


def refused(verifier: TokenVerifier, token: str) -> str | None:
    """The reason ``token`` is refused, or None if it is accepted."""
    try:
        verifier.verify(token)
    except AuthenticationError as exc:
        return exc.reason
    return None


def eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_kid_removed_at_the_issuer_is_refused_within_one_refresh(
    devenv: DevEnv, site: tuple[IssuerSite, str]
) -> None:
    """The acceptance test: the background refresh (every second, as the issuer's max-age
    says) drops the removed kid; a token it signed, verified and cached before, is refused
    after the first refresh that follows, while tokens of the remaining key go on working."""
    issuer_site, url = site
    keys = JwksKeys(url=url, ca_file=devenv.ca_cert, min_interval=0, max_interval=60)
    verifier = TokenVerifier(settings(), keys)
    old, new = issuer_site.issuer.token("old"), issuer_site.issuer.token("new")
    assert refused(verifier, old) is None  # verified and cached
    keys.start()
    try:
        del issuer_site.issuer.keys["old"]
        removed_at = len(issuer_site.fetches)
        assert eventually(lambda: refused(verifier, old) is not None, timeout=5)
        fetches = issuer_site.fetches[removed_at:]
        assert refused(verifier, old) == "unknown_kid"
        assert 1 <= len(fetches) <= 2, fetches  # the first refresh after removal (+ a retry race)
        assert refused(verifier, new) is None
    finally:
        keys.stop()


def test_stop_waits_for_an_unknown_kids_fetch_and_starts_no_more(
    devenv: DevEnv, site: tuple[IssuerSite, str]
) -> None:
    """An unknown kid starts a fetch in the background; ``stop()`` waits for it, and after it
    an unknown kid starts none. (A fetch left running against an issuer already shut down once
    leaked a TLS socket inside the standard library: a ResourceWarning in a clean-clone run.)"""
    issuer_site, url = site
    keys = JwksKeys(url=url, ca_file=devenv.ca_cert, min_interval=0)
    verifier = TokenVerifier(settings(), keys)
    issuer_site.issuer.add_key("later")
    fetched = len(issuer_site.fetches)
    assert refused(verifier, issuer_site.issuer.token("later")) == "unknown_kid"
    keys.stop()
    assert len(issuer_site.fetches) == fetched + 1  # the fetch it started ran to its end
    assert not [t for t in threading.enumerate() if t.name == "jwks-fetch"]
    issuer_site.issuer.add_key("after-stop")
    assert refused(verifier, issuer_site.issuer.token("after-stop")) == "unknown_kid"
    time.sleep(0.3)
    assert len(issuer_site.fetches) == fetched + 1  # none after stop()


def test_without_a_refresh_the_cached_token_is_still_accepted(
    devenv: DevEnv, site: tuple[IssuerSite, str]
) -> None:
    """The bound is one refresh, not zero: until the next refresh the removed kid still
    verifies (so the test above is not vacuous), and exactly one refresh ends that."""
    issuer_site, url = site
    clock = FakeMonotonic()
    keys = JwksKeys(url=url, ca_file=devenv.ca_cert, min_interval=30, monotonic=clock)
    verifier = TokenVerifier(settings(), keys)
    old = issuer_site.issuer.token("old")
    assert refused(verifier, old) is None
    del issuer_site.issuer.keys["old"]
    keys.refresh_if_due()  # not yet due (max-age 1 s is raised to min_interval, 30 s)
    assert refused(verifier, old) is None
    clock.now += 30
    keys.refresh_if_due()
    assert refused(verifier, old) == "unknown_kid"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"cache-control": "public, max-age=120"}, 120),
        ({"cache-control": "max-age=5"}, 30),  # below the minimum interval
        ({"cache-control": "max-age=86400"}, 300),  # above the maximum interval
        ({"cache-control": "max-age=200", "age": "150"}, 50),  # already 150 s old in a cache
        ({"cache-control": "no-store"}, 30),
        ({"cache-control": "max-age=soon"}, 300),  # malformed: as if absent
        ({}, 300),
    ],
)
def test_the_refresh_interval_follows_max_age_within_bounds(
    devenv: DevEnv, site: tuple[IssuerSite, str], headers: dict[str, str], expected: float
) -> None:
    """The next fetch is ``max-age`` (less ``Age``) after the last, clamped to
    [jwks_refresh_interval, jwks_max_refresh_interval]; no max-age: the maximum."""
    issuer_site, url = site
    issuer_site.headers = headers
    clock = FakeMonotonic()
    keys = JwksKeys(
        url=url, ca_file=devenv.ca_cert, min_interval=30, max_interval=300, monotonic=clock
    )
    assert len(issuer_site.fetches) == 1
    clock.now += expected - 0.5
    keys.refresh_if_due()
    assert len(issuer_site.fetches) == 1
    clock.now += 0.5
    keys.refresh_if_due()
    assert len(issuer_site.fetches) == 2


def test_cache_lifetime_reads_cache_control() -> None:
    assert cache_lifetime({"cache-control": "max-age=60, must-revalidate"}) == 60
    assert cache_lifetime({"cache-control": 'MAX-AGE="60"'}) == 60
    assert cache_lifetime({"cache-control": "max-age=60", "age": "90"}) == 0
    assert cache_lifetime({"cache-control": "private"}) is None
    assert cache_lifetime({"cache-control": "no-cache, max-age=60"}) == 0
    assert cache_lifetime({}) is None


def test_a_failed_refresh_keeps_the_last_keys_for_a_bounded_time(
    devenv: DevEnv, site: tuple[IssuerSite, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The issuer down: the last good keys stay (one warning, retries every min_interval);
    past max_stale every token is refused (an error says so); the issuer back: accepted."""
    issuer_site, url = site
    clock = FakeMonotonic()
    keys = JwksKeys(
        url=url, ca_file=devenv.ca_cert, min_interval=10, max_interval=60, max_stale=300,
        monotonic=clock,
    )  # fmt: skip
    verifier = TokenVerifier(settings(token_cache_size=0), keys)
    token = issuer_site.issuer.token("new")
    issuer_site.status = 503
    with caplog.at_level(logging.INFO, logger="keybroker.adapters.tokens"):
        for _ in range(4):
            clock.now += 60
            keys.refresh_if_due()
            assert refused(verifier, token) is None  # 60 … 240 s without a good fetch
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "last good keys stay" in warnings[0].getMessage()
        assert "HTTPError" in warnings[0].getMessage()

        clock.now += 70  # 310 s since the last good fetch
        keys.refresh_if_due()
        assert keys.stale()
        assert refused(verifier, token) == "unknown_kid"
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "every token is refused" in errors[0].getMessage()

        issuer_site.status = 200
        clock.now += 10
        keys.refresh_if_due()
        assert refused(verifier, token) is None
        assert any("succeeded again" in r.getMessage() for r in caplog.records)


def test_a_jwks_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    """jwks_file: a removed kid is refused, an added one accepted, within about a second of
    the file changing (no unknown kid needed to trigger it); a broken file keeps the keys."""
    issuer = Issuer()
    issuer.add_key("a")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    keys = JwksKeys(file=path, min_interval=3600)  # an unknown kid never re-reads here
    verifier = TokenVerifier(settings(), keys)
    token_a = issuer.token("a")
    assert refused(verifier, token_a) is None
    keys.start()
    try:
        path.write_text("{not json")
        time.sleep(1.5)
        assert refused(verifier, token_a) is None  # the broken file changed nothing
        issuer.add_key("b")
        del issuer.keys["a"]
        tmp = path.with_suffix(".new")
        tmp.write_text(json.dumps(issuer.jwks()))
        tmp.replace(path)
        assert eventually(lambda: refused(verifier, token_a) == "unknown_kid", timeout=5)
        assert refused(verifier, issuer.token("b")) is None
    finally:
        keys.stop()


def test_an_unchanged_key_keeps_cached_tokens(devenv: DevEnv, site: tuple[IssuerSite, str]) -> None:
    """A refresh that leaves a key as it was keeps the tokens it verified in the cache (no
    re-verification storm every refresh); a key replaced under the same kid does not."""
    issuer_site, url = site
    clock = FakeMonotonic()
    keys = JwksKeys(url=url, ca_file=devenv.ca_cert, min_interval=1, monotonic=clock)
    verifier = TokenVerifier(settings(), keys)
    token = issuer_site.issuer.token("new")
    verifier.verify(token)
    key = keys.current("new")
    clock.now += 400
    keys.refresh_if_due()
    assert keys.current("new") is key
    issuer_site.issuer.add_key("new")  # a new key pair under the same kid
    clock.now += 400
    keys.refresh_if_due()
    assert keys.current("new") is not key
    assert refused(verifier, token) == "bad_signature"


def test_the_refresh_bounds_are_checked(devenv: DevEnv) -> None:
    """Negative intervals and a staleness bound shorter than the refresh interval are refused."""
    with pytest.raises(ConfigurationError, match="jwks_max_staleness"):
        load_settings(devenv, auth_jwks_max_staleness="1m")
    with pytest.raises(ConfigurationError, match="jwks_max_staleness"):
        load_settings(devenv, auth_jwks_refresh_interval="2d")
    with pytest.raises(ConfigurationError, match="jwks_max_refresh_interval"):
        load_settings(devenv, auth_jwks_max_refresh_interval="-5")
    # a minimum above the maximum (set before the maximum existed) still starts: it wins
    assert load_settings(devenv, auth_jwks_refresh_interval="1h").auth.jwks_refresh_interval == 3600
    loaded = load_settings(devenv)
    assert loaded.auth.jwks_max_refresh_interval == 300
    assert loaded.auth.jwks_max_staleness == 86400
