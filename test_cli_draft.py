"""Command-line tests of buffylite: ``python -m buffylite`` in real subprocesses (SPEC §13).

Self-contained so it can be merged into ``test_buffylite.py``: every fixture and
helper here is prefixed ``cli_`` / ``Cli`` / ``CLI_``. Each test runs the CLI as a
child process (``sys.executable -m buffylite``, cwd = the repository, a timeout on
every call) against a real HTTP origin on 127.0.0.1, with ``BUFFYLITE_CACHE``
pointing into the test's ``tmp_path`` unless ``--cache`` is given. What the CLI
printed is checked against the Python API on the same cache file. No mocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import pathlib
import pty
import select
import socket
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import buffylite

#: Interpreter and directory the CLI runs with (the module is found on the cwd).
CLI_PYTHON = sys.executable
CLI_REPO_DIR = pathlib.Path(__file__).resolve().parent
#: Seconds any one CLI invocation may run before the test fails.
CLI_TIMEOUT_SEC = 30
#: Options that make an expected network failure fast.
CLI_FAIL_FAST = ("--retries", "0", "--timeout", "2")
#: A binary body: every byte value, CRLF line ends, a NUL run, every byte value backwards.
CLI_BINARY_BODY = bytes(range(256)) + b"line one\r\nline two\r\n\r\n" + b"\x00" * 64 + bytes(range(255, -1, -1))
#: Size of the body used for the progress-bar tests (bytes).
CLI_LARGE_BODY_BYTES = 4 * 1024 * 1024


# ===========================================================================
# Fixtures and helpers
# ===========================================================================


@dataclasses.dataclass
class CliRoute:
    """What the origin answers on one path; tests change ``body`` etc. between requests.

    ``etag`` is sent as a validator and a matching ``If-None-Match`` gets a 304.
    ``content_disposition`` is sent as that header when set.
    """

    body: bytes = b"hello"
    status: int = 200
    content_type: str = "application/octet-stream"
    etag: str | None = None
    content_disposition: str | None = None


class CliOrigin:
    """A threaded HTTP/1.1 server on 127.0.0.1:0 with a route table and a request log.

    ``route(path, body, ...)`` adds or replaces a route and returns it (mutable);
    ``url(path)`` is the full URL; ``hits(path)`` counts the requests received for
    ``path``; ``log`` holds ``(method, path_with_query, headers)`` of every request.
    Unknown paths answer 404.
    """

    def __init__(self) -> None:
        self.routes: dict[str, CliRoute] = {}
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def route(self, path: str, body: bytes = b"hello", **fields) -> CliRoute:
        """Create (or replace) the route for ``path`` and return it."""
        with self._lock:
            self.routes[path] = CliRoute(body=body, **fields)
            return self.routes[path]

    def url(self, path: str) -> str:
        """The full URL of ``path`` on this origin."""
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        """How many requests reached ``path`` (query string ignored)."""
        with self._lock:
            return sum(1 for _, target, _ in self.log if urllib.parse.urlsplit(target).path == path)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {key.lower(): value for key, value in handler.headers.items()}
        with self._lock:
            self.log.append((handler.command, handler.path, headers))
            route = self.routes.get(urllib.parse.urlsplit(handler.path).path)
            route = dataclasses.replace(route) if route else CliRoute(b"no such route", status=404)
        if route.status == 200 and route.etag and headers.get("if-none-match") == route.etag:
            handler.send_response(304)
            handler.send_header("ETag", route.etag)
            handler.end_headers()
            return
        handler.send_response(route.status)
        if route.etag:
            handler.send_header("ETag", route.etag)
        if route.content_disposition:
            handler.send_header("Content-Disposition", route.content_disposition)
        handler.send_header("Content-Type", route.content_type)
        handler.send_header("Content-Length", str(len(route.body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(route.body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # idle keep-alive connections end on their own

            def do_GET(self):  # noqa: N802 - http.server's naming
                origin._answer(self)

            do_HEAD = do_POST = do_PUT = do_GET  # noqa: N815

            def log_message(self, *args):  # keep test output quiet
                pass

        return Handler


@pytest.fixture
def cli_origin():
    """A real HTTP origin on 127.0.0.1 (see ``CliOrigin``), shut down at teardown."""
    server = CliOrigin()
    yield server
    server.close()


@pytest.fixture
def cli_cache_path(tmp_path) -> pathlib.Path:
    """The cache file the CLI uses by default (via ``BUFFYLITE_CACHE``); not created yet."""
    return tmp_path / "cli-cache.sqlite3"


def cli_env(**overrides: str) -> dict[str, str]:
    """Our environment minus every BUFFYLITE_* and proxy setting, loopback unproxied, plus ``overrides``."""
    env = {key: value for key, value in os.environ.items()
           if not key.upper().startswith("BUFFYLITE_") and "PROXY" not in key.upper()}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(overrides)
    return env


@pytest.fixture
def cli_run(cli_cache_path):
    """Run ``python -m buffylite *args``; return the CompletedProcess (stdout bytes, stderr str).

    ``BUFFYLITE_CACHE`` is ``cli_cache_path`` unless ``env`` replaces the environment;
    ``stdout`` may be an open binary file (as with ``> file`` in a shell).
    """

    def run(*args: str, env: dict[str, str] | None = None, stdout=subprocess.PIPE,
            timeout: float = CLI_TIMEOUT_SEC) -> subprocess.CompletedProcess:
        done = subprocess.run([CLI_PYTHON, "-m", "buffylite", *args], cwd=CLI_REPO_DIR,
                              env=env if env is not None else cli_env(BUFFYLITE_CACHE=str(cli_cache_path)),
                              stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                              timeout=timeout)
        done.stderr = done.stderr.decode("utf-8", "replace")
        return done

    return run


@pytest.fixture
def cli_json(cli_run):
    """Run the CLI with ``--json``, assert exit 0, and return the parsed stdout."""

    def run(*args: str, **kwargs):
        done = cli_run("--json", *args, **kwargs)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run


@contextlib.contextmanager
def cli_open_cache(path: pathlib.Path):
    """The same cache file opened through the Python API, closed afterwards."""
    cache = buffylite.Cache(path)
    try:
        yield cache
    finally:
        cache.close()


def cli_closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.bin"


def cli_stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The non-empty lines the process wrote to stderr."""
    return [line for line in done.stderr.splitlines() if line.strip()]


def cli_fetch_versions(cli_run, cli_origin: CliOrigin, path: str, bodies: list[bytes]) -> list[str]:
    """Through the CLI: fetch ``path`` once per body (origin changed before each, strategy
    when_requested, keep 10); return the stored ready versions, oldest first, as
    ``versions --json`` lists them."""
    cli_origin.routes.get(path) or cli_origin.route(path)
    for body in bodies:
        cli_origin.routes[path].body = body
        done = cli_run("fetch", cli_origin.url(path), "--strategy", "when_requested", "--keep", "10", "-q")
        assert done.returncode == 0, done.stderr
        assert done.stdout == body
    done = cli_run("versions", cli_origin.url(path), "--json")
    assert done.returncode == 0, done.stderr
    return [entry["version"] for entry in json.loads(done.stdout)][::-1]


@pytest.fixture
def cli_seed(cli_origin, cli_cache_path, monkeypatch):
    """Set up state fast, in-process, through the Python API: ``cli_seed(path, bodies)``
    fetches ``path`` once per body (origin changed before each; strategy when_requested,
    keep 10) into ``cli_cache_path`` and returns the version strings, oldest first."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    configuration = buffylite.RequestCacheConfiguration(
        recaching_strategy=buffylite.ReCachingStrategy.when_requested(), max_cached_unpinned_versions=10)

    def seed(path: str, bodies: list[bytes]) -> list[str]:
        route = cli_origin.routes.get(path) or cli_origin.route(path)
        versions = []
        with cli_open_cache(cli_cache_path) as cache:
            for body in bodies:
                route.body = body
                response = cache.fetch(cli_origin.url(path), cache_configuration=configuration, offline=False)
                assert response.outcome == "downloaded"
                versions.append(response.version)
        return versions

    return seed


# ===========================================================================
# fetch: content, stderr status line, -o / -d (§13)
# ===========================================================================


def test_cli_fetch_to_stdout_is_byte_identical_to_origin(cli_run, cli_origin, tmp_path):
    """§13: `fetch URL > file` writes exactly the origin's binary bytes."""
    cli_origin.route("/binary.bin", CLI_BINARY_BODY)
    target = tmp_path / "redirected.bin"
    with open(target, "wb") as redirected:
        done = cli_run("fetch", cli_origin.url("/binary.bin"), stdout=redirected)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == CLI_BINARY_BODY


def test_cli_fetch_from_cache_to_stdout_is_byte_identical(cli_run, cli_origin):
    """§13: a second `fetch` served from the cache writes the same bytes, with no new request."""
    cli_origin.route("/binary.bin", CLI_BINARY_BODY)
    first = cli_run("fetch", cli_origin.url("/binary.bin"))
    second = cli_run("fetch", cli_origin.url("/binary.bin"))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout == CLI_BINARY_BODY
    assert cli_origin.hits("/binary.bin") == 1


def test_cli_fetch_stderr_names_version_and_outcome(cli_run, cli_origin, cli_cache_path):
    """§13: `fetch` tells on stderr which version it returned and whether it came from the cache."""
    cli_origin.route("/status.bin", b"status body")
    url = cli_origin.url("/status.bin")
    first = cli_run("fetch", url)
    second = cli_run("fetch", url)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    with cli_open_cache(cli_cache_path) as cache:
        version = cache.get(url).version
    assert version in first.stderr and "downloaded" in first.stderr
    assert version in second.stderr and "cached" in second.stderr
    assert len(cli_stderr_lines(first)) == len(cli_stderr_lines(second)) == 1


@pytest.mark.parametrize("placement", ["before", "after"])
def test_cli_fetch_quiet_silences_stderr(cli_run, cli_origin, placement):
    """§13: `-q` (before or after the subcommand) leaves stderr empty on success."""
    cli_origin.route("/quiet.bin", CLI_BINARY_BODY)
    url = cli_origin.url("/quiet.bin")
    args = ("-q", "fetch", url) if placement == "before" else ("fetch", url, "-q")
    done = cli_run(*args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == CLI_BINARY_BODY


def test_cli_fetch_output_file(cli_run, cli_origin, tmp_path):
    """§13: `fetch -o FILE` writes the content to FILE and nothing to stdout."""
    cli_origin.route("/out.bin", CLI_BINARY_BODY)
    target = tmp_path / "sub" / "saved.bin"
    done = cli_run("fetch", cli_origin.url("/out.bin"), "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == CLI_BINARY_BODY
    assert done.stdout == b""


def test_cli_fetch_dir_names_file_from_content_disposition(cli_run, cli_origin, tmp_path):
    """§13: `fetch -d DIR` saves under the Content-Disposition file name and says where."""
    cli_origin.route("/download", CLI_BINARY_BODY, content_disposition='attachment; filename="ontology.owl"')
    directory = tmp_path / "downloads"
    done = cli_run("fetch", cli_origin.url("/download"), "-d", str(directory))
    assert done.returncode == 0, done.stderr
    saved = directory / "ontology.owl"
    assert saved.read_bytes() == CLI_BINARY_BODY
    assert sorted(path.name for path in directory.iterdir()) == ["ontology.owl"]
    assert done.stdout == b""
    assert "ontology.owl" in done.stderr


def test_cli_fetch_json_matches_api(cli_run, cli_origin, cli_json, cli_cache_path):
    """§13: `fetch --json` describes the returned version as the Python API does."""
    cli_origin.route("/j.bin", CLI_BINARY_BODY, etag='"v1"')
    url = cli_origin.url("/j.bin")
    data = cli_json("fetch", url)
    with cli_open_cache(cli_cache_path) as cache:
        latest = cache.get(url)
    assert data["version"] == latest.version
    assert data["outcome"] == "downloaded"
    assert data["content_hash_hex"] == latest.content_hash_hex == hashlib.sha256(CLI_BINARY_BODY).hexdigest()
    assert data["content_attributes"]["etag"] == '"v1"'
    assert data["content_attributes"]["content_size_bytes"] == len(CLI_BINARY_BODY)


def test_cli_fetch_params_headers_and_group_reach_origin(cli_run, cli_origin, cli_cache_path):
    """§13: `--param`, `--header` and `--group` mirror fetch()'s identity arguments."""
    cli_origin.route("/q", b"query body")
    url = cli_origin.url("/q")
    done = cli_run("fetch", url, "--param", "term=cell", "--header", "X-Probe: yes", "--group", "g1")
    assert done.returncode == 0, done.stderr
    method, target, headers = cli_origin.log[-1]
    assert method == "GET"
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(target).query) == {"term": ["cell"]}
    assert headers["x-probe"] == "yes"
    with cli_open_cache(cli_cache_path) as cache:
        assert cache.get_request(url, params={"term": "cell"}, headers={"X-Probe": "yes"},
                                 group="g1") is not None
        assert cache.get_request(url) is None


# ===========================================================================
# Global options (§13)
# ===========================================================================


@pytest.mark.parametrize("layout", [
    ("--cache", "{path}", "--json", "info"),
    ("info", "--cache", "{path}", "--json"),
    ("--json", "info", "--cache", "{path}"),
])
def test_cli_global_options_before_or_after_subcommand(cli_run, tmp_path, layout):
    """§13: `--cache` and `--json` work before or after the subcommand."""
    path = tmp_path / "explicit.sqlite3"
    args = [item.format(path=path) for item in layout]
    done = cli_run(*args, env=cli_env())  # no BUFFYLITE_CACHE: --cache must be what counts
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(path)
    assert path.exists()


def test_cli_cache_option_overrides_environment(cli_run, cli_origin, cli_cache_path, tmp_path):
    """§13: `--cache PATH` wins over $BUFFYLITE_CACHE."""
    cli_origin.route("/where.bin", b"where")
    explicit = tmp_path / "explicit.sqlite3"
    done = cli_run("fetch", cli_origin.url("/where.bin"), "--cache", str(explicit), "-q")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(explicit) as cache:
        assert cache.get(cli_origin.url("/where.bin")).read() == b"where"
    assert not cli_cache_path.exists()


def test_cli_verbose_logs_on_success(cli_run, cli_origin):
    """§13: `-v` after the subcommand is accepted and adds log lines to the status line."""
    cli_origin.route("/v.bin", b"verbose")
    plain = cli_run("fetch", cli_origin.url("/v.bin"), "--strategy", "when_requested")
    cli_origin.routes["/v.bin"].body = b"verbose, changed"
    verbose = cli_run("fetch", cli_origin.url("/v.bin"), "-v")
    assert plain.returncode == verbose.returncode == 0, plain.stderr + verbose.stderr
    assert verbose.stdout == b"verbose, changed"
    assert len(cli_stderr_lines(plain)) == 1
    assert len(cli_stderr_lines(verbose)) > 1
    assert "Traceback" not in verbose.stderr


# ===========================================================================
# Cache configuration and fetch choices (§5, §7, §13)
# ===========================================================================


def test_cli_configuration_options_merge_over_stored_configuration(cli_run, cli_origin, cli_cache_path):
    """§13: `--strategy`, `--keep`, `--keep-pinned` each change one field and keep the others."""
    cli_origin.route("/conf.bin", b"conf")
    url = cli_origin.url("/conf.bin")
    for option in (("--strategy", "age:123"), ("--keep", "5"), ("--keep-pinned", "3")):
        done = cli_run("fetch", url, *option, "-q")
        assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        configuration = cache.get_request(url).cache_configuration
    assert configuration.recaching_strategy.strategy_name == "age"
    assert configuration.recaching_strategy.seconds == 123
    assert configuration.max_cached_unpinned_versions == 5
    assert configuration.max_cached_pinned_versions == 3


def test_cli_offline_fetch_stores_configuration_options(cli_run, cli_origin, cli_cache_path):
    """§5/§13: `fetch --offline --keep N` still stores the merged configuration with the request."""
    cli_origin.route("/conf-off.bin", b"conf")
    url = cli_origin.url("/conf-off.bin")
    assert cli_run("fetch", url, "--strategy", "age:50", "-q").returncode == 0
    done = cli_run("fetch", url, "--keep", "7", "--offline", "-q")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        configuration = cache.get_request(url).cache_configuration
    assert configuration.max_cached_unpinned_versions == 7
    assert configuration.recaching_strategy.strategy_name == "age"


def test_cli_strategy_change_keeps_stored_keep_counts(cli_run, cli_origin, cli_cache_path):
    """§13: a later `--strategy` alone keeps the stored `--keep`/`--keep-pinned` values."""
    cli_origin.route("/conf2.bin", b"conf")
    url = cli_origin.url("/conf2.bin")
    assert cli_run("fetch", url, "--keep", "4", "--keep-pinned", "0", "-q").returncode == 0
    done = cli_run("fetch", url, "--strategy", "when_remote_changed:60:600", "-q")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        configuration = cache.get_request(url).cache_configuration
    assert configuration.max_cached_unpinned_versions == 4
    assert configuration.max_cached_pinned_versions == 0
    assert configuration.recaching_strategy.strategy_name == "when_remote_changed"
    assert configuration.recaching_strategy.check_interval_sec == 60
    assert configuration.recaching_strategy.fallback_max_age_sec == 600


def test_cli_fetch_pin_pins_returned_version(cli_run, cli_origin, cli_cache_path):
    """§13: `fetch --pin` pins the returned version permanently."""
    cli_origin.route("/pin.bin", b"pin me")
    url = cli_origin.url("/pin.bin")
    done = cli_run("fetch", url, "--pin")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        latest = cache.get(url)
    assert latest.pinned is True
    assert latest.version in done.stderr


def test_cli_fetch_pin_for_leases_returned_version(cli_run, cli_origin, cli_cache_path):
    """§13: `fetch --pin-for SECONDS` leases the returned version without a permanent pin."""
    cli_origin.route("/lease.bin", b"lease me")
    url = cli_origin.url("/lease.bin")
    before = dt.datetime.now(dt.timezone.utc)
    done = cli_run("fetch", url, "--pin-for", "600")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        latest = cache.get(url)
    assert latest.pinned is False and latest.is_pinned
    remaining = (latest.pinned_until_utc - before).total_seconds()
    assert 590 <= remaining <= 660


def test_cli_fetch_tag_tags_returned_version(cli_run, cli_origin, cli_cache_path):
    """§13: `fetch --tag T` (repeatable) tags the returned version."""
    cli_origin.route("/tag.bin", b"tag me")
    url = cli_origin.url("/tag.bin")
    done = cli_run("fetch", url, "--tag", "release-1", "--tag", "golden")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        assert sorted(cache.get(url).tags) == ["golden", "release-1"]


def test_cli_fetch_offline_never_touches_origin(cli_run, cli_origin):
    """§13: `fetch --offline` serves the cache even under when_requested, with no request."""
    cli_origin.route("/off.bin", CLI_BINARY_BODY)
    url = cli_origin.url("/off.bin")
    assert cli_run("fetch", url, "--strategy", "when_requested", "-q").returncode == 0
    assert cli_origin.hits("/off.bin") == 1
    cli_origin.routes["/off.bin"].body = b"changed upstream"
    done = cli_run("fetch", url, "--offline")
    assert done.returncode == 0, done.stderr
    assert done.stdout == CLI_BINARY_BODY
    assert "offline" in done.stderr
    assert cli_origin.hits("/off.bin") == 1


def test_cli_fetch_offline_with_nothing_cached_fails_without_request(cli_run, cli_origin):
    """§13/§7: `--offline` with nothing cached: exit 1, one stderr line, no request made."""
    cli_origin.route("/never.bin", b"never fetched")
    done = cli_run("fetch", cli_origin.url("/never.bin"), "--offline")
    assert done.returncode == 1
    assert len(cli_stderr_lines(done)) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == b""
    assert cli_origin.hits("/never.bin") == 0


def test_cli_offline_environment_variable(cli_run, cli_origin, cli_cache_path):
    """§3/§13: BUFFYLITE_OFFLINE=1 keeps `fetch` off the network."""
    cli_origin.route("/envoff.bin", b"env offline")
    url = cli_origin.url("/envoff.bin")
    assert cli_run("fetch", url, "--strategy", "when_requested", "-q").returncode == 0
    done = cli_run("fetch", url, env=cli_env(BUFFYLITE_CACHE=str(cli_cache_path), BUFFYLITE_OFFLINE="yes"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"env offline"
    assert cli_origin.hits("/envoff.bin") == 1


def test_cli_expected_hash_mismatch_exits_1(cli_run, cli_origin, cli_cache_path):
    """§13/§7: `--expected-hash` that the content does not have: exit 1, one line, no content out."""
    cli_origin.route("/hash.bin", CLI_BINARY_BODY)
    url = cli_origin.url("/hash.bin")
    done = cli_run("fetch", url, "--expected-hash", "sha256:" + "0" * 64)
    assert done.returncode == 1
    assert done.stdout == b""
    lines = cli_stderr_lines(done)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        assert cache.versions(url) == []
        failed = cache.versions(url, status="failed")
    assert len(failed) == 1


def test_cli_expected_hash_match_exits_0(cli_run, cli_origin):
    """§13/§7: `--expected-hash` equal to the content's hash (bare hex) succeeds."""
    cli_origin.route("/hash-ok.bin", CLI_BINARY_BODY)
    done = cli_run("fetch", cli_origin.url("/hash-ok.bin"),
                   "--expected-hash", hashlib.sha256(CLI_BINARY_BODY).hexdigest())
    assert done.returncode == 0, done.stderr
    assert done.stdout == CLI_BINARY_BODY


def test_cli_fetch_force_version_returns_that_version_offline(cli_run, cli_origin, cli_seed):
    """§13/§7: `--force-version V` returns exactly V's content and never downloads."""
    old, new = cli_seed("/fv.bin", [b"old content", b"new content"])
    hits = cli_origin.hits("/fv.bin")
    done = cli_run("fetch", cli_origin.url("/fv.bin"), "--force-version", old)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"old content"
    assert old in done.stderr and new not in done.stderr
    assert cli_origin.hits("/fv.bin") == hits


def test_cli_fetch_force_version_unknown_exits_1(cli_run, cli_origin, cli_seed):
    """§13/§7: `--force-version` of a version that does not exist: exit 1, one stderr line."""
    cli_seed("/fv2.bin", [b"only"])
    done = cli_run("fetch", cli_origin.url("/fv2.bin"), "--force-version", "20000101000000000000")
    assert done.returncode == 1
    assert len(cli_stderr_lines(done)) == 1, done.stderr
    assert done.stdout == b""


def test_cli_fetch_prefer_tag_returns_tagged_version(cli_run, cli_origin, cli_seed):
    """§13/§7: `--prefer-tag T` returns the newest version carrying T."""
    old, new = cli_seed("/pt.bin", [b"tagged content", b"newer content"])
    assert cli_run("tag", cli_origin.url("/pt.bin"), old, "golden").returncode == 0
    done = cli_run("fetch", cli_origin.url("/pt.bin"), "--prefer-tag", "golden")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"tagged content"
    assert old in done.stderr


def test_cli_fetch_prefer_missing_tag_falls_back_to_latest(cli_run, cli_origin, cli_seed):
    """§7/§13: a `--prefer-tag` nobody carries never fails; the latest version comes back."""
    old, new = cli_seed("/pt2.bin", [b"first", b"second"])
    done = cli_run("fetch", cli_origin.url("/pt2.bin"), "--prefer-tag", "nobody", "--offline")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"second"


# ===========================================================================
# Inspection: versions, requests, show, info (§13)
# ===========================================================================


def test_cli_versions_json_matches_api(cli_run, cli_origin, cli_cache_path):
    """§13: `versions --json` lists the same versions (newest first) as cache.versions()."""
    versions = cli_fetch_versions(cli_run, cli_origin, "/vs.bin", [b"one", b"two", b"three"])
    url = cli_origin.url("/vs.bin")
    done = cli_run("--json", "versions", url)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    with cli_open_cache(cli_cache_path) as cache:
        expected = cache.versions(url)
    assert [entry["version"] for entry in data] == [response.version for response in expected]
    assert [entry["version"] for entry in data] == versions[::-1]
    assert data == [response.model_dump(mode="json") for response in expected]


def test_cli_versions_human_table_lists_each_version(cli_run, cli_origin, cli_seed):
    """§13: `versions URL` prints a table with one row per version and its hash prefix."""
    versions = cli_seed("/vt.bin", [b"alpha", b"beta"])
    done = cli_run("versions", cli_origin.url("/vt.bin"))
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    for version, body in zip(versions, [b"alpha", b"beta"]):
        row = next(line for line in text.splitlines() if version in line)
        assert hashlib.sha256(body).hexdigest()[:12] in row
        assert "ready" in row


def test_cli_versions_status_all_includes_failed(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `versions --status all` also lists failed attempts, as cache.versions(status=None)."""
    cli_seed("/vf.bin", [b"good"])
    url = cli_origin.url("/vf.bin")
    cli_origin.routes["/vf.bin"].status = 500
    stale = cli_run("fetch", url, "--strategy", "when_requested", *CLI_FAIL_FAST)
    assert stale.returncode == 0, stale.stderr
    assert stale.stdout == b"good" and "stale" in stale.stderr
    done = cli_run("versions", url, "--status", "all", "--json")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        expected = cache.versions(url, status=None)
    assert sorted(entry["status"] for entry in json.loads(done.stdout)) == ["failed", "ready"]
    assert [entry["version"] for entry in json.loads(done.stdout)] == [response.version for response in expected]


def test_cli_requests_json_matches_api(cli_run, cli_origin, cli_cache_path):
    """§13: `requests --json` lists the stored requests as cache.requests(); `--group` filters."""
    cli_origin.route("/ra.bin", b"a")
    cli_origin.route("/rb.bin", b"b")
    assert cli_run("fetch", cli_origin.url("/ra.bin"), "--group", "alpha", "-q").returncode == 0
    assert cli_run("fetch", cli_origin.url("/rb.bin"), "--group", "beta", "-q").returncode == 0
    everything = cli_run("requests", "--json")
    only_beta = cli_run("requests", "--group", "beta", "--json")
    human = cli_run("requests")
    assert everything.returncode == only_beta.returncode == human.returncode == 0
    with cli_open_cache(cli_cache_path) as cache:
        assert json.loads(everything.stdout) == [request.model_dump(mode="json") for request in cache.requests()]
        assert json.loads(only_beta.stdout) == [request.model_dump(mode="json")
                                                for request in cache.requests("beta")]
    assert [entry["url"] for entry in json.loads(only_beta.stdout)] == [cli_origin.url("/rb.bin")]
    assert cli_origin.url("/ra.bin") in human.stdout.decode() and "alpha" in human.stdout.decode()


def test_cli_show_json_matches_api(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `show URL [VERSION]` gives one version's fields as cache.get() has them."""
    old, new = cli_seed("/show.bin", [b"old", b"new"])
    url = cli_origin.url("/show.bin")
    latest = cli_run("show", url, "--json")
    chosen = cli_run("--json", "show", url, old)
    assert latest.returncode == chosen.returncode == 0, latest.stderr + chosen.stderr
    with cli_open_cache(cli_cache_path) as cache:
        expected_latest = cache.get(url).model_dump(mode="json")
        expected_old = cache.get(url, old).model_dump(mode="json")
    for data, expected in ((json.loads(latest.stdout), expected_latest), (json.loads(chosen.stdout), expected_old)):
        assert data["version"] == expected["version"]
        assert data["content_hash_hex"] == expected["content_hash_hex"]
        assert data["previous_version"] == expected["previous_version"]
        assert data["next_version"] == expected["next_version"]
        assert data["content_attributes"] == expected["content_attributes"]
    assert json.loads(latest.stdout)["version"] == new


def test_cli_show_human_lists_fields(cli_run, cli_origin, cli_seed):
    """§13: `show URL` prints the version, status and hash in human form."""
    (version,) = cli_seed("/showh.bin", [b"shown"])
    done = cli_run("show", cli_origin.url("/showh.bin"))
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert version in text and "ready" in text
    assert hashlib.sha256(b"shown").hexdigest() in text


def test_cli_show_unknown_url_exits_1(cli_run, cli_origin):
    """§13: `show` of a URL never fetched: exit 1 with one stderr line, no traceback."""
    done = cli_run("show", cli_origin.url("/unknown.bin"))
    assert done.returncode == 1
    assert len(cli_stderr_lines(done)) == 1 and "Traceback" not in done.stderr, done.stderr


def test_cli_info_json_matches_stats(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `info --json` reports what cache.stats() does: path, counts, sizes, versions."""
    cli_seed("/info.bin", [b"x" * 1000, b"y" * 2000])
    done = cli_run("info", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    with cli_open_cache(cli_cache_path) as cache:
        stats = cache.stats()
    for key in ("path", "requests", "versions", "content_bytes", "unique_contents",
                "schema_version", "sqlite_version"):
        assert data[key] == stats[key], key
    assert data["path"] == str(cli_cache_path)
    assert data["versions"]["ready"] == 2 and data["content_bytes"] == 3000
    assert data["file_size_bytes"] > 0


def test_cli_info_human_shows_path_sqlite_and_schema(cli_run, cli_cache_path):
    """§13 / issue 6: `info` shows the path, file size, counts per status, SQLite and schema version."""
    done = cli_run("info")
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    with cli_open_cache(cli_cache_path) as cache:
        stats = cache.stats()
    assert str(cli_cache_path) in text
    assert stats["sqlite_version"] in text
    assert "schema" in text.lower() and "ready" in text


# ===========================================================================
# Pins and tags (§9, §13)
# ===========================================================================


def test_cli_pin_and_unpin(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `pin URL VERSION` pins permanently; `unpin URL VERSION` clears it."""
    (version,) = cli_seed("/p.bin", [b"pinned"])
    url = cli_origin.url("/p.bin")
    pinned = cli_run("pin", url, version, "--json")
    assert pinned.returncode == 0, pinned.stderr
    with cli_open_cache(cli_cache_path) as cache:
        assert cache.get(url, version).pinned is True
    assert json.loads(pinned.stdout)["pinned"] is True
    unpinned = cli_run("unpin", url, version)
    assert unpinned.returncode == 0, unpinned.stderr
    assert version in unpinned.stdout.decode()
    with cli_open_cache(cli_cache_path) as cache:
        after = cache.get(url, version)
    assert after.pinned is False and not after.is_pinned


def test_cli_pin_for_sets_lease(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `pin URL VERSION --for SECONDS` leases the version instead of pinning it."""
    (version,) = cli_seed("/pf.bin", [b"leased"])
    url = cli_origin.url("/pf.bin")
    before = dt.datetime.now(dt.timezone.utc)
    done = cli_run("pin", url, version, "--for", "3600", "--json")
    assert done.returncode == 0, done.stderr
    with cli_open_cache(cli_cache_path) as cache:
        response = cache.get(url, version)
    assert response.pinned is False and response.is_pinned
    assert 3590 <= (response.pinned_until_utc - before).total_seconds() <= 3660
    data = json.loads(done.stdout)
    assert data["pinned"] is False
    assert dt.datetime.fromisoformat(data["pinned_until_utc"]) == response.pinned_until_utc


def test_cli_tag_and_untag(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `tag URL VERSION TAG` adds a tag; `untag URL VERSION TAG` removes it."""
    old, new = cli_seed("/t.bin", [b"v1", b"v2"])
    url = cli_origin.url("/t.bin")
    tagged = cli_run("tag", url, old, "release-2024", "--json")
    assert tagged.returncode == 0, tagged.stderr
    assert json.loads(tagged.stdout)["tags"] == ["release-2024"]
    with cli_open_cache(cli_cache_path) as cache:
        assert cache.get(url, old).tags == ["release-2024"]
        assert cache.get(url, new).tags == []
    untagged = cli_run("untag", url, old, "release-2024")
    assert untagged.returncode == 0, untagged.stderr
    with cli_open_cache(cli_cache_path) as cache:
        assert cache.get(url, old).tags == []


def test_cli_tag_invalid_name_exits_1(cli_run, cli_origin, cli_seed):
    """§4/§13: a tag outside 2-64 chars of [A-Za-z0-9_-] is refused: exit 1, one stderr line."""
    (version,) = cli_seed("/tbad.bin", [b"v1"])
    done = cli_run("tag", cli_origin.url("/tbad.bin"), version, "no spaces!")
    assert done.returncode == 1
    assert len(cli_stderr_lines(done)) == 1 and "Traceback" not in done.stderr, done.stderr


# ===========================================================================
# Maintenance: gc, verify, refresh, delete (§10, §13)
# ===========================================================================


def test_cli_gc_applies_lowered_keep(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13/§10: after `--keep 1` is stored by a fetch served from cache (no fetch-time GC), `gc` removes the extras."""
    cli_seed("/gc.bin", [b"a" * 100, b"b" * 100, b"c" * 100])
    url = cli_origin.url("/gc.bin")
    lowered = cli_run("fetch", url, "--keep", "1", "--strategy", "never", "-q")
    assert lowered.returncode == 0, lowered.stderr
    with cli_open_cache(cli_cache_path) as cache:
        assert len(cache.versions(url)) == 3  # serving from the cache runs no GC (§10)
    done = cli_run("gc", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= {"removed", "bytes_freed", "file_size_before", "file_size_after"}
    assert report["removed"]["unpinned"] == 2
    assert report["bytes_freed"] == 200
    with cli_open_cache(cli_cache_path) as cache:
        remaining = cache.versions(url)
    assert [response.read() for response in remaining] == [b"c" * 100]


def test_cli_gc_human_output(cli_run, cli_origin, cli_seed):
    """§13: `gc` without --json prints what it removed and the file size, exit 0."""
    cli_seed("/gch.bin", [b"only"])
    done = cli_run("gc")
    assert done.returncode == 0, done.stderr
    assert b"removed" in done.stdout and b"bytes" in done.stdout


def test_cli_verify_intact_exits_0(cli_run, cli_origin, cli_seed):
    """§13: `verify` on intact content exits 0 with nothing on stderr."""
    cli_seed("/ok.bin", [CLI_BINARY_BODY, b"second"])
    done = cli_run("verify")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    json_done = cli_run("verify", "--json")
    assert json_done.returncode == 0
    assert json.loads(json_done.stdout) == {"checked": 2, "corrupted": []}


def cli_corrupt_content(path: pathlib.Path, content_hash: str) -> None:
    """Flip every byte of the first chunk of the content with ``content_hash`` (sqlite3, not the API)."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        (content_id,) = connection.execute("SELECT id FROM content WHERE hash_hex = ?", (content_hash,)).fetchone()
        (data,) = connection.execute("SELECT data FROM chunk WHERE content_id = ? ORDER BY seq LIMIT 1",
                                     (content_id,)).fetchone()
        flipped = bytes(byte ^ 0xFF for byte in data)
        connection.execute("UPDATE chunk SET data = ? WHERE content_id = ? AND seq = "
                           "(SELECT MIN(seq) FROM chunk WHERE content_id = ?)", (flipped, content_id, content_id))
        connection.commit()


def test_cli_verify_corrupted_exits_1_with_one_stderr_line(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `verify` finding corrupted content exits 1 after one stderr line with the count."""
    old, new = cli_seed("/bad.bin", [CLI_BINARY_BODY, b"untouched"])
    url = cli_origin.url("/bad.bin")
    cli_corrupt_content(cli_cache_path, hashlib.sha256(CLI_BINARY_BODY).hexdigest())
    done = cli_run("verify")
    assert done.returncode == 1
    lines = cli_stderr_lines(done)
    assert len(lines) == 1, done.stderr
    assert "1" in lines[0] and "version" in lines[0]
    assert old in done.stdout.decode()
    with cli_open_cache(cli_cache_path) as cache:
        assert [response.version for response in cache.versions(url)] == [new]
        (failed,) = cache.versions(url, status="failed")
    assert failed.version == old
    assert failed.download_stats.error == "content corrupted"


def test_cli_verify_corrupted_json_lists_versions(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `verify --json` lists the corrupted versions and still exits 1."""
    (version,) = cli_seed("/badj.bin", [CLI_BINARY_BODY])
    cli_corrupt_content(cli_cache_path, hashlib.sha256(CLI_BINARY_BODY).hexdigest())
    done = cli_run("--json", "verify")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["checked"] == 1
    assert [entry["version"] for entry in report["corrupted"]] == [version]


def test_cli_refresh_applies_each_strategy(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `refresh` re-checks stored requests per their strategy and reports the outcome."""
    cli_seed("/r.bin", [b"before"])
    url = cli_origin.url("/r.bin")
    cli_origin.routes["/r.bin"].body = b"after"
    done = cli_run("refresh", "--json")
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    with cli_open_cache(cli_cache_path) as cache:
        latest = cache.get(url)
    assert result["url"] == url and result["outcome"] == "downloaded"
    assert result["version"] == latest.version
    assert latest.read() == b"after"


def test_cli_refresh_group_limits_to_group(cli_run, cli_origin):
    """§13: `refresh --group G` touches only the requests of group G."""
    for path, group in (("/ga.bin", "alpha"), ("/gb.bin", "beta")):
        cli_origin.route(path, b"body")
        done = cli_run("fetch", cli_origin.url(path), "--group", group, "--strategy", "when_requested", "-q")
        assert done.returncode == 0, done.stderr
    done = cli_run("refresh", "--group", "beta", "--json")
    assert done.returncode == 0, done.stderr
    assert [result["url"] for result in json.loads(done.stdout)] == [cli_origin.url("/gb.bin")]
    assert cli_origin.hits("/ga.bin") == 1 and cli_origin.hits("/gb.bin") == 2
    human = cli_run("refresh", "--group", "alpha")
    assert human.returncode == 0, human.stderr
    assert cli_origin.url("/ga.bin") in human.stdout.decode()


def test_cli_delete_forgets_request(cli_run, cli_origin, cli_cache_path, cli_seed):
    """§13: `delete URL` removes the request and its versions and says how many."""
    cli_seed("/del.bin", [b"one", b"two"])
    url = cli_origin.url("/del.bin")
    done = cli_run("delete", url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["versions_removed"] == 2
    with cli_open_cache(cli_cache_path) as cache:
        assert cache.get_request(url) is None
        assert cache.stats()["unique_contents"] == 0
    again = cli_run("delete", url, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["versions_removed"] == 0
    human = cli_run("delete", url)
    assert human.returncode == 0, human.stderr
    assert url in human.stdout.decode()


# ===========================================================================
# Errors and exit statuses (§13)
# ===========================================================================


def test_cli_unreachable_url_one_line_exit_1(cli_run):
    """§13 / issue 6: unreachable URL, nothing cached: exit 1, one stderr line, no traceback."""
    url = cli_closed_port_url()
    done = cli_run("fetch", url, *CLI_FAIL_FAST)
    assert done.returncode == 1
    lines = cli_stderr_lines(done)
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert url in lines[0]
    assert done.stdout == b""


def test_cli_quiet_still_reports_errors(cli_run):
    """§13: `-q` silences status output but an error still gets its one stderr line."""
    done = cli_run("fetch", cli_closed_port_url(), "-q", *CLI_FAIL_FAST)
    assert done.returncode == 1
    assert len(cli_stderr_lines(done)) == 1, done.stderr


def test_cli_unreachable_url_verbose_shows_traceback(cli_run):
    """§13: with `-v` the same failure also prints a traceback."""
    done = cli_run("-v", "fetch", cli_closed_port_url(), *CLI_FAIL_FAST)
    assert done.returncode == 1
    assert "Traceback" in done.stderr


def test_cli_unreachable_url_with_cache_serves_stale(cli_run, cli_origin, cli_seed):
    """§6/§13: a due download failing with a version cached serves it (outcome stale), exit 0."""
    cli_seed("/st.bin", [CLI_BINARY_BODY])
    cli_origin.routes["/st.bin"].status = 503
    done = cli_run("fetch", cli_origin.url("/st.bin"), *CLI_FAIL_FAST)
    assert done.returncode == 0, done.stderr
    assert done.stdout == CLI_BINARY_BODY
    assert "stale" in done.stderr


@pytest.mark.parametrize("args", [
    ("frobnicate",),
    (),
    ("fetch",),
    ("fetch", "{url}", "--strategy", "sometimes"),
    ("fetch", "{url}", "--strategy", "age:soon"),
    ("fetch", "{url}", "--keep", "many"),
    ("fetch", "{url}", "-o", "a.bin", "-d", "dir"),
    ("pin", "{url}"),
], ids=["unknown-command", "no-command", "fetch-no-url", "bad-strategy", "bad-age",
        "bad-keep", "output-and-dir", "pin-no-version"])
def test_cli_usage_errors_exit_2(cli_run, cli_origin, args):
    """§13: usage errors exit 2 without a traceback and without touching the origin."""
    cli_origin.route("/u.bin", b"usage")
    done = cli_run(*[item.format(url=cli_origin.url("/u.bin")) for item in args])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "usage" in done.stderr.lower()
    assert cli_origin.hits("/u.bin") == 0


@pytest.mark.parametrize("kind", ["text", "other-sqlite"])
def test_cli_not_a_buffylite_file_exits_1_naming_path(cli_run, tmp_path, kind):
    """§13/§10: a cache path that is no buffylite file: exit 1, one line naming the path."""
    path = tmp_path / f"not-a-cache-{kind}.sqlite3"
    if kind == "text":
        path.write_bytes(b"this is a text file, not a database\n" * 100)
    else:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
            connection.execute("INSERT INTO notes (body) VALUES ('someone else''s data')")
            connection.commit()
    before = path.read_bytes()
    done = cli_run("--cache", str(path), "info")
    assert done.returncode == 1
    lines = cli_stderr_lines(done)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(path) in lines[0]
    assert path.read_bytes() == before


def test_cli_fetch_non_http_url_exits_1(cli_run):
    """§11/§13: a non-http(s) URL is refused with one stderr line and exit 1."""
    done = cli_run("fetch", "ftp://127.0.0.1/file.bin", *CLI_FAIL_FAST)
    assert done.returncode == 1
    assert len(cli_stderr_lines(done)) == 1 and "Traceback" not in done.stderr, done.stderr


# ===========================================================================
# Progress bar (§13)
# ===========================================================================


def cli_large_body() -> bytes:
    """~4 MiB of non-repeating bytes (so nothing compresses or deduplicates by accident)."""
    seed = hashlib.sha256(b"buffylite-cli").digest()
    blocks, counter = [], 0
    while len(blocks) * 32 < CLI_LARGE_BODY_BYTES:
        blocks.append(hashlib.sha256(seed + counter.to_bytes(8, "big")).digest())
        counter += 1
    return b"".join(blocks)[:CLI_LARGE_BODY_BYTES]


def cli_env_without_tqdm(tmp_path: pathlib.Path, **overrides: str) -> dict[str, str]:
    """``cli_env`` whose PYTHONPATH starts with a ``tqdm`` package that fails to import,
    so the CLI runs as if the optional progress extra were not installed."""
    shadow = tmp_path / "no-tqdm" / "tqdm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("tqdm hidden by the test")\n')
    env = cli_env(**overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("bar_library", ["tqdm", "none"])
def test_cli_progress_bar_on_terminal(cli_origin, cli_cache_path, tmp_path, bar_library):
    """§13: while downloading, a progress bar appears on stderr when stderr is a terminal
    (with the optional tqdm extra and without it)."""
    body = cli_large_body()
    cli_origin.route("/large.bin", body)
    output = tmp_path / "large.out"
    env = cli_env(BUFFYLITE_CACHE=str(cli_cache_path))
    if bar_library == "none":
        env = cli_env_without_tqdm(tmp_path, BUFFYLITE_CACHE=str(cli_cache_path))
    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pty reports 0x0, which progress libraries treat
    # as "no room to draw". Give it the classic 80x24.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        with open(output, "wb") as stdout:
            process = subprocess.Popen(
                [CLI_PYTHON, "-m", "buffylite", "fetch", cli_origin.url("/large.bin")],
                cwd=CLI_REPO_DIR, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=slave)
        os.close(slave)
        slave = None
        captured = bytearray()
        deadline = time.monotonic() + CLI_TIMEOUT_SEC
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                captured += chunk
            elif process.poll() is not None:
                break
        returncode = process.wait(timeout=CLI_TIMEOUT_SEC)
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    text = captured.decode("utf-8", "replace")
    assert returncode == 0, text
    assert output.read_bytes() == body
    assert ("%" if bar_library == "tqdm" else "MiB") in text, text
    assert "downloaded" in text


def test_cli_no_progress_bar_without_terminal(cli_run, cli_origin, tmp_path):
    """§13: with stderr not a terminal, stderr carries only the status line, no bar."""
    body = cli_large_body()
    cli_origin.route("/large.bin", body)
    target = tmp_path / "large.out"
    with open(target, "wb") as redirected:
        done = cli_run("fetch", cli_origin.url("/large.bin"), stdout=redirected)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == body
    assert "%" not in done.stderr and "MiB" not in done.stderr and "\r" not in done.stderr
    assert len(cli_stderr_lines(done)) == 1, done.stderr
