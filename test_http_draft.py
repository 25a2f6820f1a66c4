"""HTTP-fault and concurrency tests for buffylite (SPEC §6 fallback, §7, §10, §11, §12).

A draft to be merged into ``test_buffylite.py``: it is self-contained, and every fixture and
helper is prefixed ``fault_`` / ``_fault`` / ``Fault`` so that nothing clashes.

The origin is a raw-socket server (not ``http.server``) so that it can misbehave: cut a
body, reset a connection, lie about ``Content-Length``, stall, drip, redirect in circles.
It records every request it sees and how many body bytes it sent, so the tests can count
what went upstream. No HTTP or SQLite is mocked; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import functools
import gzip
import hashlib
import http
import itertools
import json
import logging
import os
import random
import re
import select
import signal
import socket
import socketserver
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest

import buffylite

_FAULT_HERE = Path(__file__).resolve().parent
_FAULT_MIB = 1024 * 1024
#: Body bytes the origin sends per ``sendall`` when not dripping.
_FAULT_SEND_CHUNK_BYTES = 256 * 1024
#: How long an idle keep-alive connection is kept open by the fake servers.
_FAULT_IDLE_SEC = 10.0
#: Upper bound of any single test (SIGALRM); a hung fetch fails instead of hanging CI.
_FAULT_TEST_TIMEOUT_SEC = 150
#: Environment variables that would change where requests go.
_FAULT_ENV_VARS = (
    "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "BUFFYLITE_OFFLINE", "BUFFYLITE_CACHE", "REQUEST_METHOD",
)
#: A 100 KiB body for the fault matrix (no validators: nothing to resume).
_FAULT_BODY = bytes(range(256)) * 400
_FAULT_OLD_BODY = b"the last good version\n" * 100


# ---------------------------------------------------------------------------------------
# Fault-injecting origin server (raw sockets)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class FaultReply:
    """One scripted answer of :class:`FaultOrigin`.

    ``body`` is what a correct server would send; the other fields say how to deviate.
    With ``accept_ranges`` the reply honours ``Range: bytes=N-`` (206 + Content-Range) when
    ``If-Range`` is absent or matches ``etag`` / ``last_modified``; a matching
    ``If-None-Match`` gets a 304. Header values may be callables (evaluated when sent).
    """

    status: int = 200
    body: bytes = b""
    headers: dict = dataclasses.field(default_factory=dict)
    etag: str | None = None
    last_modified: str | None = None
    accept_ranges: bool = False
    content_length: int | None = None  # None: the true length; -1: no header at all
    extra_bytes: bytes = b""  # sent after the body: a body longer than Content-Length
    cut_after: int | None = None  # stop after this many body bytes ...
    cut_how: str = "close"  # ... and then: "close" (FIN), "reset" (RST), "stall" (silence)
    delay_sec: float = 0.0  # before the status line
    drip_after: int | None = None  # from this body offset on, send slowly:
    drip_bytes: int = 1  # this many bytes ...
    drip_interval_sec: float = 0.5  # ... every this many seconds
    gzip: bool = False  # Content-Encoding: gzip (Content-Length is the compressed size)
    raw: bytes | None = None  # send exactly these bytes instead of a response, then close


def _fault_read_head(sock, buffer, is_closing):
    """Read one request head from ``sock``; return ``(head, rest)`` or ``(None, b"")``."""
    deadline = time.monotonic() + _FAULT_IDLE_SEC
    while b"\r\n\r\n" not in buffer:
        if is_closing() or time.monotonic() > deadline or len(buffer) > 65536:
            return None, b""
        readable, _, _ = select.select([sock], [], [], 0.1)
        if not readable:
            continue
        try:
            data = sock.recv(65536)
        except OSError:
            return None, b""
        if not data:
            return None, b""
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def _fault_parse_head(head):
    """Split a request head into ``(method, target, headers)``; header names lower-cased."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return method, target, headers


def _fault_read_body(sock, buffer, headers):
    """Read a request body of ``Content-Length`` bytes (bounded); return ``(body, rest)``."""
    length = int(headers.get("content-length", "0") or 0)
    deadline = time.monotonic() + _FAULT_IDLE_SEC
    while len(buffer) < length and time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
    return buffer[:length], buffer[length:]


class _FaultTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class _FaultOriginHandler(socketserver.BaseRequestHandler):
    """Serves requests on one connection (keep-alive) as the route table says."""

    def handle(self):
        origin = self.server.fault_owner
        sock = self.request
        sock.settimeout(30)  # bounds every sendall to a reader that stopped reading
        buffer = b""
        try:
            while not origin.closing:
                head, buffer = _fault_read_head(sock, buffer, lambda: origin.closing)
                if head is None:
                    return
                method, target, headers = _fault_parse_head(head)
                _body, buffer = _fault_read_body(sock, buffer, headers)
                if not origin._answer(sock, method, target, headers):
                    return
        except OSError:
            return  # the client went away (or was killed): nothing to do


class FaultOrigin:
    """An HTTP/1.1 origin on ``127.0.0.1:<free port>`` driven by a per-path route table.

    ``route(path, reply0, reply1, ...)``: the n-th request to ``path`` gets reply n (the
    last one repeats); a reply may also be a callable ``(record) -> FaultReply``.
    Unknown paths get 404. ``requests`` holds one record per request: ``method``,
    ``target``, ``path``, ``headers`` (lower-case names), ``status`` and ``bytes_sent``
    (body bytes, updated while sending).
    """

    def __init__(self):
        self.routes = {}
        self.requests = []
        self.closing = False
        self._counts = {}
        self._lock = threading.Lock()
        self._server = _FaultTCPServer(("127.0.0.1", 0), _FaultOriginHandler)
        self._server.fault_owner = self
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path):
        return self.base_url + path

    def route(self, path, *replies):
        """Set the replies for ``path`` and restart its request counter."""
        with self._lock:
            self.routes[path] = list(replies)
            self._counts[path] = 0

    def hits(self, path=None, method="GET"):
        """Snapshot of the records for ``path`` (all paths if None) with ``method``."""
        with self._lock:
            return [dict(record) for record in self.requests
                    if (path is None or record["path"] == path)
                    and (method is None or record["method"] == method)]

    def served_bytes(self, path):
        return sum(record["bytes_sent"] for record in self.hits(path, method=None))

    def close(self):
        self.closing = True
        self._server.shutdown()
        self._server.server_close()

    # -- serving ------------------------------------------------------------------------

    def _answer(self, sock, method, target, headers):
        """Send one reply; return whether the connection may serve another request."""
        path = urlsplit(target).path or "/"
        record = {"method": method, "target": target, "path": path, "headers": headers,
                  "status": None, "bytes_sent": 0}
        with self._lock:
            self.requests.append(record)
            replies = self.routes.get(path)
            index = self._counts.get(path, 0)
            self._counts[path] = index + 1
        if not replies:
            reply = FaultReply(status=404, body=b"no such route\n")
        else:
            reply = replies[min(index, len(replies) - 1)]
        if callable(reply):
            reply = reply(record)
        deadline = time.monotonic() + reply.delay_sec
        while time.monotonic() < deadline and not self.closing:
            time.sleep(0.02)
        if reply.raw is not None:
            sock.sendall(reply.raw)
            return False
        status, out_headers, body = self._shape(reply, method, headers)
        client_closes = headers.get("connection", "").lower() == "close"
        if client_closes:
            out_headers["Connection"] = "close"
        phrase = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "X"
        head = f"HTTP/1.1 {status} {phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in out_headers.items()) + "\r\n"
        record["status"] = status  # recorded before sending: the client may be faster
        sock.sendall(head.encode("latin-1"))
        if method == "HEAD" or status in (204, 304):
            return not client_closes
        if reply.extra_bytes:  # body and excess in one send: they arrive together
            record["bytes_sent"] += len(body) + len(reply.extra_bytes)
            sock.sendall(bytes(body) + reply.extra_bytes)
            return not client_closes
        if not self._send_body(sock, record, body, reply):
            return False
        return not client_closes

    def _shape(self, reply, method, headers):
        """Status, headers and body view for ``reply`` given the request headers."""
        status = reply.status
        body = reply.body
        out = {}
        if reply.gzip:
            body = gzip.compress(body, mtime=0)
            out["Content-Encoding"] = "gzip"
        if reply.etag:
            out["ETag"] = reply.etag
        if reply.last_modified:
            out["Last-Modified"] = reply.last_modified
        if reply.accept_ranges:
            out["Accept-Ranges"] = "bytes"
        view = memoryview(body)
        validators = {v for v in (reply.etag, reply.last_modified) if v}
        if status == 200 and reply.etag and headers.get("if-none-match") == reply.etag:
            status, view = 304, memoryview(b"")
        elif status == 200 and reply.accept_ranges and "range" in headers:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", headers["range"].strip())
            if_range = headers.get("if-range")
            if match and (if_range is None or if_range in validators):
                total = len(view)
                start = int(match[1])
                end = min(int(match[2]), total - 1) if match[2] else total - 1
                if start >= total:
                    status, view = 416, memoryview(b"")
                    out["Content-Range"] = f"bytes */{total}"
                else:
                    status, view = 206, view[start:end + 1]
                    out["Content-Range"] = f"bytes {start}-{end}/{total}"
        for name, value in reply.headers.items():
            out[name] = value() if callable(value) else value
        length = len(view) if reply.content_length is None else reply.content_length
        if length != -1 and status != 304:
            out["Content-Length"] = str(length)
        return status, out, view

    def _send_body(self, sock, record, view, reply):
        """Send the body, dripping or cutting it as scripted; False once the connection is cut."""
        total = len(view)
        limit = total if reply.cut_after is None else min(reply.cut_after, total)
        pos = 0
        while pos < limit:  # bounded: every pass sends at least one byte
            if self.closing:
                return False
            if reply.drip_after is not None and pos >= reply.drip_after:
                time.sleep(reply.drip_interval_sec)
                step = reply.drip_bytes
            else:
                step = _FAULT_SEND_CHUNK_BYTES
                if reply.drip_after is not None:
                    step = min(step, reply.drip_after - pos)
            step = min(step, limit - pos)
            record["bytes_sent"] += step  # counted first: an upper bound of what was served
            sock.sendall(view[pos:pos + step])
            pos += step
        if limit == total:
            return True
        if reply.cut_how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        elif reply.cut_how == "stall":
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and not self.closing:
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable and not sock.recv(65536):
                    break  # the client gave up
        return False  # "close": socketserver shuts the socket down (FIN)


# ---------------------------------------------------------------------------------------
# Loopback forward proxy (plain HTTP, absolute-URI request lines)
# ---------------------------------------------------------------------------------------

_FAULT_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                     "te", "trailer", "transfer-encoding", "upgrade"}


class _FaultProxyHandler(socketserver.BaseRequestHandler):
    """Forwards one request per connection and records it."""

    def handle(self):
        proxy = self.server.fault_owner
        sock = self.request
        sock.settimeout(30)
        try:
            head, rest = _fault_read_head(sock, b"", lambda: proxy.closing)
            if head is None:
                return
            method, target, headers = _fault_parse_head(head)
            body, _ = _fault_read_body(sock, rest, headers)
            with proxy._lock:
                proxy.requests.append({"method": method, "target": target, "headers": headers})
            if method == "CONNECT" or not target.startswith("http://"):
                sock.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            parts = urlsplit(target)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            forwarded = "".join(f"{name}: {value}\r\n" for name, value in headers.items()
                                if name not in _FAULT_HOP_BY_HOP)
            upstream_request = (f"{method} {path} HTTP/1.1\r\n{forwarded}"
                                "Connection: close\r\n\r\n").encode("latin-1") + body
            with socket.create_connection((parts.hostname, parts.port or 80), timeout=30) as up:
                up.sendall(upstream_request)
                while True:  # bounded: the origin closes after one response (Connection: close)
                    data = up.recv(65536)
                    if not data:
                        break
                    sock.sendall(data)
        except OSError:
            return


class FaultProxy:
    """A forward proxy on ``127.0.0.1:<free port>``; ``requests`` records what passed."""

    def __init__(self):
        self.requests = []
        self.closing = False
        self._lock = threading.Lock()
        self._server = _FaultTCPServer(("127.0.0.1", 0), _FaultProxyHandler)
        self._server.fault_owner = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.closing = True
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------
# Subprocess workers
# ---------------------------------------------------------------------------------------

#: The worker a subprocess runs: ``python fault_worker.py '<json args>'``. It prints
#: ``READY`` once buffylite is imported and the Cache open, waits for ``GO`` on stdin when
#: asked, and prints one ``RESULT <json>`` line.
_FAULT_WORKER_SOURCE = textwrap.dedent('''
    import hashlib, json, random, sys, time
    import buffylite

    def config(name):
        if name is None:
            return None
        strategy = getattr(buffylite.ReCachingStrategy, name)()
        return buffylite.RequestCacheConfiguration(recaching_strategy=strategy)

    def result(payload):
        print("RESULT " + json.dumps(payload), flush=True)

    def fetch_once(cache, args):
        try:
            resp = cache.fetch(args["url"], cache_configuration=config(args.get("strategy")))
            digest = hashlib.sha256(resp.read()).hexdigest()
        except Exception as exc:
            result({"error": f"{type(exc).__name__}: {exc}"})
            return 1
        result({"version": resp.version, "outcome": resp.outcome, "sha256": digest})
        return 0

    def mixed(cache, args):
        rng = random.Random(args["seed"])
        urls = args["urls"]
        refetch = config("when_requested")
        ops, benign, errors = {}, 0, []
        deadline = time.monotonic() + args["duration_sec"]
        while time.monotonic() < deadline:
            url = rng.choice(urls)
            op = rng.choice(["fetch", "fetch", "fetch_offline", "pin", "pin_lease", "unpin",
                             "tag", "untag", "gc", "verify", "get", "read"])
            try:
                if op == "fetch":
                    cache.fetch(url, cache_configuration=refetch)
                elif op == "fetch_offline":
                    cache.fetch(url, offline=True, pin_for=0.5)
                elif op == "gc":
                    cache.gc()
                elif op == "verify":
                    report = cache.verify()
                    if report.corrupted:
                        errors.append(f"verify: corrupted {[r.version for r in report.corrupted]}")
                elif op == "get":
                    resp = cache.get(url)
                    if hashlib.sha256(resp.read()).hexdigest() != resp.content_hash_hex:
                        errors.append(f"get: wrong content for {resp.version}")
                else:
                    versions = cache.versions(url)
                    if not versions:
                        continue
                    resp = rng.choice(versions)
                    if op == "pin":
                        cache.pin(resp)
                    elif op == "pin_lease":
                        cache.pin(resp, seconds=0.5)
                    elif op == "unpin":
                        cache.unpin(resp)
                    elif op == "tag":
                        cache.tag(resp, rng.choice(["alpha", "beta"]))
                    elif op == "untag":
                        cache.untag(resp, rng.choice(["alpha", "beta"]))
                    elif op == "read":
                        with cache.lease(resp, 1.0):
                            data = resp.read()
                        if hashlib.sha256(data).hexdigest() != resp.content_hash_hex:
                            errors.append(f"read: wrong content for {resp.version}")
                ops[op] = ops.get(op, 0) + 1
            except buffylite.NotCachedError:
                benign += 1  # a version another process removed meanwhile
            except Exception as exc:
                errors.append(f"{op}: {type(exc).__name__}: {exc}")
        result({"ops": ops, "benign": benign, "errors": errors[:20], "error_count": len(errors)})
        return 0

    def main():
        args = json.loads(sys.argv[1])
        cache = buffylite.Cache(args["cache"], **args.get("cache_kwargs", {}))
        print("READY", flush=True)
        if args.get("wait_go") and sys.stdin.readline().strip() != "GO":
            return 3
        try:
            if args["mode"] == "fetch":
                return fetch_once(cache, args)
            return mixed(cache, args)
        finally:
            cache.close()

    sys.exit(main())
''')


class FaultWorkers:
    """Starts worker subprocesses and reads their lines with timeouts; kills leftovers."""

    def __init__(self, tmp_path):
        self._dir = tmp_path
        self.script = tmp_path / "fault_worker.py"
        self.script.write_text(_FAULT_WORKER_SOURCE)
        self._procs = []
        self._buffers = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(_FAULT_HERE)] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))

    def spawn(self, args):
        index = len(self._procs)
        stderr_path = self._dir / f"fault_worker_{index}.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, str(self.script), json.dumps(args)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=stderr, bufsize=0, env=self.env, cwd=str(self._dir))
        proc.fault_stderr_path = stderr_path
        self._procs.append(proc)
        self._buffers[proc.pid] = b""
        return proc

    def stderr(self, proc):
        return proc.fault_stderr_path.read_text(errors="replace")[-4000:]

    def read_line(self, proc, prefix, timeout_sec):
        """The rest of the next stdout line starting with ``prefix``; fails on timeout/EOF."""
        deadline = time.monotonic() + timeout_sec
        fd = proc.stdout.fileno()
        while True:
            buffered = self._buffers[proc.pid]
            while b"\n" in buffered:
                line, _, buffered = buffered.partition(b"\n")
                self._buffers[proc.pid] = buffered
                text = line.decode(errors="replace")
                if text.startswith(prefix):
                    return text[len(prefix):]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"worker {proc.pid}: no {prefix!r} line within {timeout_sec}s; "
                            f"stderr:\n{self.stderr(proc)}")
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.2))
            if readable:
                data = os.read(fd, 65536)
                if not data:
                    proc.wait(5)
                    pytest.fail(f"worker {proc.pid} exited ({proc.returncode}) before "
                                f"{prefix!r}; stderr:\n{self.stderr(proc)}")
                self._buffers[proc.pid] += data

    def go(self, proc):
        proc.stdin.write(b"GO\n")
        proc.stdin.flush()

    def result(self, proc, timeout_sec):
        payload = json.loads(self.read_line(proc, "RESULT ", timeout_sec))
        proc.wait(timeout_sec)
        return payload

    def close(self):
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


class FaultTestTimeout(AssertionError):
    """A test ran longer than _FAULT_TEST_TIMEOUT_SEC."""


@pytest.fixture
def fault_env(monkeypatch):
    """A clean environment (no proxies, no offline switch) and a watchdog for the test."""
    for name in _FAULT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)

    def on_alarm(signum, frame):
        raise FaultTestTimeout(f"test exceeded {_FAULT_TEST_TIMEOUT_SEC}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, _FAULT_TEST_TIMEOUT_SEC)
    yield monkeypatch
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def fault_origin():
    """The fault-injecting origin (see FaultOrigin)."""
    origin = FaultOrigin()
    yield origin
    origin.close()


@pytest.fixture
def fault_other_origin():
    """A second origin on another port: another origin for redirects and credentials."""
    origin = FaultOrigin()
    yield origin
    origin.close()


@pytest.fixture
def fault_proxy():
    """A recording loopback forward proxy."""
    proxy = FaultProxy()
    yield proxy
    proxy.close()


@pytest.fixture
def fault_cache_path(tmp_path):
    """Path of a fresh (not yet created) cache file."""
    return tmp_path / "fault-cache.sqlite3"


@pytest.fixture
def fault_open_cache(fault_env, fault_cache_path):
    """Factory: ``open(path=None, **kwargs) -> Cache`` with small timeouts; all closed after."""
    opened = []

    def open_cache(path=None, **kwargs):
        options = {"timeout": 1.0, "retries": 1, "max_retry_wait": 1.0,
                   "download_lease_sec": 2.0}
        options.update(kwargs)
        cache = buffylite.Cache(path or fault_cache_path, **options)
        opened.append(cache)
        return cache

    yield open_cache
    for cache in reversed(opened):
        with contextlib.suppress(Exception):
            cache.close()


@pytest.fixture
def fault_workers(tmp_path, fault_env):
    """Subprocess workers running _FAULT_WORKER_SOURCE; leftovers killed at teardown."""
    workers = FaultWorkers(tmp_path)
    yield workers
    workers.close()


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _fault_config(strategy):
    return buffylite.RequestCacheConfiguration(recaching_strategy=strategy)


def _fault_when_requested():
    return _fault_config(buffylite.ReCachingStrategy.when_requested())


@functools.lru_cache(maxsize=1)
def _fault_big_body():
    """64 MiB of deterministic bytes (and their sha256)."""
    body = random.Random(64).randbytes(64 * _FAULT_MIB)
    return body, hashlib.sha256(body).hexdigest()


def _fault_stream_sha256(resp):
    digest = hashlib.sha256()
    with resp.open() as stream:
        for block in iter(lambda: stream.read(_FAULT_MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _fault_range_start(record):
    match = re.fullmatch(r"bytes=(\d+)-", record["headers"].get("range", ""))
    assert match, f"expected a 'Range: bytes=N-' request, got {record['headers']}"
    return int(match[1])


def _fault_integrity(path):
    """``PRAGMA integrity_check`` on a separate sqlite3 connection."""
    connection = sqlite3.connect(str(path), timeout=10)
    try:
        return [row[0] for row in connection.execute("PRAGMA integrity_check").fetchall()]
    finally:
        connection.close()


def _fault_file_bytes(path):
    """Raw bytes of the cache file and its WAL / journal (whatever exists now)."""
    data = b""
    for suffix in ("", "-wal", "-journal"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            data += candidate.read_bytes()
    return data


def _fault_invariant_problems(cache, url, **identity):
    """Chain (§8) and content-hash (§10) problems of one request; [] when all hold."""
    problems = []
    rows = cache.versions(url, status=None, **identity)
    ready = sorted((row for row in rows if row.status == "ready"), key=lambda row: row.version)
    for index, row in enumerate(ready):
        expected = (ready[index - 1].version if index else None,
                    ready[index + 1].version if index + 1 < len(ready) else None)
        if (row.previous_version, row.next_version) != expected:
            problems.append(f"{row.version}: links {(row.previous_version, row.next_version)}"
                            f" != {expected}")
        if hashlib.sha256(row.read()).hexdigest() != row.content_hash_hex:
            problems.append(f"{row.version}: content does not match its hash")
    for row in rows:
        if row.status != "ready" and (row.previous_version or row.next_version):
            problems.append(f"{row.version} ({row.status}) is linked into the chain")
    newest_first = [row.version for row in cache.versions(url, **identity)]
    if newest_first != [row.version for row in reversed(ready)]:
        problems.append("versions() is not newest first")
    return problems


def _fault_warnings(caplog):
    return [record for record in caplog.records
            if record.name.startswith("buffylite") and record.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------
# Fault matrix (§11 retries/lengths/redirects, §6 fallback, §12 FetchError)
# ---------------------------------------------------------------------------------------

#: fault name -> (allowed FetchError.status_code values or None for any,
#:                upstream GETs expected: an int, "retried" = retries + 1, or None = bounded,
#:                whether the failure is below HTTP so ``cause`` must be set)
_FAULT_MATRIX = {
    "reset_mid_body": ({None, 200}, "retried", True),
    "short_body_then_close": ({None, 200}, "retried", True),
    "body_longer_than_content_length": ({None, 200}, None, False),
    "stall_mid_body_beyond_read_timeout": ({None, 200}, "retried", True),
    "drip_slower_than_read_timeout": ({None, 200}, "retried", True),
    "garbage_status_line": ({None}, "retried", True),
    "empty_reply": ({None}, "retried", True),
    "connection_refused": ({None}, 0, True),
    "status_500_always": ({500}, "retried", False),
    "status_404": ({404}, 1, False),
    "status_429_retry_after_seconds_beyond_cap": ({429}, 1, False),
    "status_503_retry_after_date_beyond_cap": ({503}, 1, False),
    "redirect_loop": (None, None, False),
}


def _fault_install(name, origin):
    """Route ``/fault`` (and helpers) of ``origin`` to misbehave as ``name`` says."""
    body = _FAULT_BODY
    replies = {
        "reset_mid_body": FaultReply(body=body, cut_after=20_000, cut_how="reset"),
        "short_body_then_close": FaultReply(body=body, cut_after=len(body) // 2),
        "body_longer_than_content_length": FaultReply(body=body, extra_bytes=b"X" * 5000),
        "stall_mid_body_beyond_read_timeout": FaultReply(body=body, cut_after=1000,
                                                          cut_how="stall"),
        "drip_slower_than_read_timeout": FaultReply(body=body, drip_after=1000,
                                                    drip_interval_sec=1.6),
        "garbage_status_line": FaultReply(raw=b"THIS IS NOT HTTP AT ALL\r\n\r\n"),
        "empty_reply": FaultReply(raw=b""),
        "status_500_always": FaultReply(status=500, body=b"boom\n"),
        "status_404": FaultReply(status=404, body=b"gone\n"),
        "status_429_retry_after_seconds_beyond_cap": FaultReply(
            status=429, body=b"slow down\n", headers={"Retry-After": "30"}),
        "status_503_retry_after_date_beyond_cap": FaultReply(
            status=503, body=b"later\n", headers={"Retry-After": lambda: email.utils.formatdate(
                time.time() + 120, usegmt=True)}),
        "redirect_loop": FaultReply(status=302, headers={"Location": "/fault-loop"}),
    }
    if name == "connection_refused":
        origin.close()
        return
    origin.route("/fault", replies[name])
    if name == "redirect_loop":
        origin.route("/fault-loop", FaultReply(status=302, headers={"Location": "/fault"}))


@pytest.mark.parametrize("with_prior", [False, True], ids=["no_prior", "prior_good"])
@pytest.mark.parametrize("fault", list(_FAULT_MATRIX))
def test_fault_matrix(fault, with_prior, fault_origin, fault_other_origin, fault_open_cache,
                      caplog):
    """§11/§6/§12: each fault -> FetchError (or the last good version, "stale") + a failed row."""
    allowed_status, expected_hits, needs_cause = _FAULT_MATRIX[fault]
    retries = 1
    cache = fault_open_cache(retries=retries, timeout=1.0, max_retry_wait=2.0)
    origin = fault_other_origin if fault == "connection_refused" else fault_origin
    url = origin.url("/fault")
    prior = None
    if with_prior:
        origin.route("/fault", FaultReply(body=_FAULT_OLD_BODY))
        prior = cache.fetch(url, cache_configuration=_fault_when_requested())
        assert prior.outcome == "downloaded"
    hits_before = len(fault_origin.hits("/fault", method=None)) if origin is fault_origin else 0
    _fault_install(fault, origin)
    caplog.set_level(logging.WARNING, logger="buffylite")

    started = time.monotonic()
    if with_prior:
        resp = cache.fetch(url)
        elapsed = time.monotonic() - started
        assert resp.outcome == "stale"
        assert resp.version == prior.version
        assert resp.read() == _FAULT_OLD_BODY
        assert _fault_warnings(caplog), "§6: serving stale after a failure logs a WARNING"
    else:
        with pytest.raises(buffylite.FetchError) as caught:
            cache.fetch(url)
        elapsed = time.monotonic() - started
        error = caught.value
        assert isinstance(error, buffylite.BuffyliteError)
        assert error.url == url
        if allowed_status is not None:
            assert error.status_code in allowed_status
        if needs_cause:
            assert error.cause is not None

    # What went upstream.
    if origin is fault_origin:
        hits = len(fault_origin.hits("/fault", method=None)) - hits_before
        if expected_hits == "retried":
            assert hits == retries + 1, f"{hits} requests for retries={retries}"
        elif expected_hits is not None:
            assert hits == expected_hits
        else:
            assert 1 <= hits <= 40
    if fault.endswith("beyond_cap"):
        assert elapsed < 1.0, f"§11: a Retry-After beyond max_retry_wait ends at once ({elapsed:.2f}s)"
    assert elapsed < 15

    # What is stored: one failed row with an error; ready rows untouched.
    rows = cache.versions(url, status=None)
    failed = [row for row in rows if row.status == "failed"]
    assert len(failed) == 1, [(row.version, row.status) for row in rows]
    assert failed[0].download_stats.error
    ready = [row for row in rows if row.status == "ready"]
    assert [row.version for row in ready] == ([prior.version] if prior else [])
    for row in ready:
        assert row.read() == _FAULT_OLD_BODY
    assert not [row for row in rows if row.status in ("wait", "in_progress", "duplicate")]


@pytest.mark.parametrize("status,retry_after", [
    (429, "1"),
    (503, "1"),
    (503, "http-date"),
], ids=["429_seconds", "503_seconds", "503_http_date"])
def test_retry_after_is_honoured_then_success(status, retry_after, fault_origin,
                                              fault_open_cache):
    """§11: 429/503 with Retry-After (seconds or HTTP date) within the cap: wait, retry, succeed."""
    if retry_after == "http-date":
        header = lambda: email.utils.formatdate(time.time() + 2, usegmt=True)  # noqa: E731
    else:
        header = retry_after
    fault_origin.route("/busy", FaultReply(status=status, body=b"busy\n",
                                           headers={"Retry-After": header}),
                       FaultReply(body=b"finally\n"))
    cache = fault_open_cache(retries=3, max_retry_wait=3.0)
    started = time.monotonic()
    resp = cache.fetch(fault_origin.url("/busy"))
    elapsed = time.monotonic() - started
    assert resp.outcome == "downloaded"
    assert resp.read() == b"finally\n"
    assert len(fault_origin.hits("/busy")) == 2
    assert 0.8 <= elapsed < 6, f"waited {elapsed:.2f}s"


def test_retry_after_beyond_cap_with_prior_serves_stale_after_one_request(fault_origin,
                                                                          fault_open_cache):
    """§11/§6: Retry-After > max_retry_wait: one request, no wait, the last good version."""
    url = fault_origin.url("/pause")
    fault_origin.route("/pause", FaultReply(body=_FAULT_OLD_BODY))
    cache = fault_open_cache(retries=5, max_retry_wait=2.0)
    prior = cache.fetch(url, cache_configuration=_fault_when_requested())
    fault_origin.route("/pause", FaultReply(status=429, headers={"Retry-After": "3600"}))
    started = time.monotonic()
    resp = cache.fetch(url)
    assert time.monotonic() - started < 1.0
    assert (resp.outcome, resp.version) == ("stale", prior.version)
    assert len(fault_origin.hits("/pause")) == 1


def test_read_timeout_is_per_read_not_total(fault_origin, fault_open_cache):
    """§3/§11: a drip whose gaps stay under the read timeout completes, however long it takes."""
    fault_origin.route("/drip", FaultReply(body=b"abcdef", drip_after=0, drip_interval_sec=0.4))
    cache = fault_open_cache(timeout=1.0, retries=0)
    started = time.monotonic()
    resp = cache.fetch(fault_origin.url("/drip"))
    assert time.monotonic() - started > 2.0
    assert resp.read() == b"abcdef"
    assert len(fault_origin.hits("/drip")) == 1


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1/file.txt",
    "file:///etc/passwd",
    "gopher://127.0.0.1/x",
    "127.0.0.1/no-scheme",
])
def test_only_http_and_https_urls(url, fault_open_cache, fault_cache_path):
    """§11/§12: other schemes -> InvalidRequestError (a ValueError), nothing written."""
    cache = fault_open_cache()
    before = _fault_file_bytes(fault_cache_path)
    with pytest.raises(buffylite.InvalidRequestError) as caught:
        cache.fetch(url)
    assert isinstance(caught.value, ValueError)
    assert cache.requests() == []
    assert _fault_file_bytes(fault_cache_path) == before


def test_user_agent_names_buffylite_version(fault_origin, fault_open_cache):
    """§11: requests carry ``User-Agent: buffylite/<version>``."""
    fault_origin.route("/ua", FaultReply(body=b"ok"))
    fault_open_cache().fetch(fault_origin.url("/ua"))
    (hit,) = fault_origin.hits("/ua")
    assert hit["headers"]["user-agent"] == f"buffylite/{buffylite.__version__}"


# ---------------------------------------------------------------------------------------
# Redirects and credentials (§11)
# ---------------------------------------------------------------------------------------

_FAULT_CREDENTIALS = {"Authorization": "Bearer REDIRECT-SECRET",
                      "Cookie": "session=REDIRECT-COOKIE",
                      "Proxy-Authorization": "Basic UkVESVJFQ1Q="}


def test_redirect_chain_is_followed(fault_origin, fault_open_cache):
    """§11: 301 -> 302 -> 200: the final content, stored under the requested URL."""
    fault_origin.route("/r1", FaultReply(status=301, headers={"Location": "/r2"}))
    fault_origin.route("/r2", FaultReply(status=302,
                                         headers={"Location": fault_origin.url("/final")}))
    fault_origin.route("/final", FaultReply(body=b"arrived\n"))
    cache = fault_open_cache()
    url = fault_origin.url("/r1")
    resp = cache.fetch(url)
    assert resp.read() == b"arrived\n"
    assert cache.get(url).version == resp.version
    assert cache.get_request(url) is not None


def test_credentials_not_forwarded_to_another_origin(fault_origin, fault_other_origin,
                                                     fault_open_cache):
    """§11: Authorization, Cookie, Proxy-Authorization dropped on a redirect to another port."""
    fault_origin.route("/away", FaultReply(
        status=302, headers={"Location": fault_other_origin.url("/landing")}))
    fault_other_origin.route("/landing", FaultReply(body=b"elsewhere\n"))
    resp = fault_open_cache().fetch(fault_origin.url("/away"), headers=_FAULT_CREDENTIALS)
    assert resp.read() == b"elsewhere\n"
    (first,) = fault_origin.hits("/away")
    assert first["headers"]["authorization"] == _FAULT_CREDENTIALS["Authorization"]
    (landing,) = fault_other_origin.hits("/landing")
    for name in ("authorization", "cookie", "proxy-authorization"):
        assert name not in landing["headers"], f"{name} leaked to another origin"


def test_credentials_forwarded_on_same_origin_redirect(fault_origin, fault_open_cache):
    """§11: a redirect within the same origin keeps the credentials."""
    fault_origin.route("/here", FaultReply(status=307, headers={"Location": "/there"}))
    fault_origin.route("/there", FaultReply(body=b"same origin\n"))
    resp = fault_open_cache().fetch(fault_origin.url("/here"), headers=_FAULT_CREDENTIALS)
    assert resp.read() == b"same origin\n"
    (landing,) = fault_origin.hits("/there")
    for name, value in _FAULT_CREDENTIALS.items():
        assert landing["headers"].get(name.lower()) == value


# ---------------------------------------------------------------------------------------
# Proxies from the environment (§11)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_http_proxy_from_environment(variable, fault_origin, fault_proxy, fault_env,
                                     fault_open_cache):
    """§11: HTTP_PROXY (either case) sends http:// requests through the proxy."""
    fault_origin.route("/via-proxy", FaultReply(body=b"proxied\n"))
    fault_env.setenv(variable, fault_proxy.url)
    url = fault_origin.url("/via-proxy")
    resp = fault_open_cache().fetch(url)
    assert resp.read() == b"proxied\n"
    assert [request["target"] for request in fault_proxy.requests] == [url]
    assert len(fault_origin.hits("/via-proxy")) == 1


def test_proxy_credentials_from_proxy_url(fault_origin, fault_proxy, fault_env,
                                          fault_open_cache):
    """§11: user:password in HTTP_PROXY becomes Proxy-Authorization to the proxy (as requests)."""
    fault_origin.route("/auth-proxy", FaultReply(body=b"ok\n"))
    fault_env.setenv("HTTP_PROXY", fault_proxy.url.replace("http://", "http://alice:s%40cret@"))
    fault_open_cache().fetch(fault_origin.url("/auth-proxy"))
    (request,) = fault_proxy.requests
    expected = "Basic " + __import__("base64").b64encode(b"alice:s@cret").decode()
    assert request["headers"].get("proxy-authorization") == expected


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_bypasses_proxy(no_proxy, fault_origin, fault_proxy, fault_env,
                                 fault_open_cache):
    """§11: a host listed in NO_PROXY is fetched directly."""
    fault_origin.route("/direct", FaultReply(body=b"direct\n"))
    fault_env.setenv("HTTP_PROXY", fault_proxy.url)
    fault_env.setenv("NO_PROXY", no_proxy)
    resp = fault_open_cache().fetch(fault_origin.url("/direct"))
    assert resp.read() == b"direct\n"
    assert fault_proxy.requests == []
    assert len(fault_origin.hits("/direct")) == 1


def test_https_proxy_not_used_for_http_urls(fault_origin, fault_proxy, fault_env,
                                            fault_open_cache):
    """§11: HTTPS_PROXY applies to https:// URLs only."""
    fault_origin.route("/plain", FaultReply(body=b"plain\n"))
    fault_env.setenv("HTTPS_PROXY", fault_proxy.url)
    fault_open_cache().fetch(fault_origin.url("/plain"))
    assert fault_proxy.requests == []
    assert len(fault_origin.hits("/plain")) == 1


# ---------------------------------------------------------------------------------------
# Resume (§11, issue 4 must-show #2)
# ---------------------------------------------------------------------------------------


def test_resume_64mib_after_cut_uses_one_range_request(fault_origin, fault_open_cache):
    """§11: a 64 MiB body cut at half resumes with one Range request; ~32 MiB re-served."""
    body, sha256 = _fault_big_body()
    half = len(body) // 2
    fault_origin.route("/big.bin",
                       FaultReply(body=body, etag='"big-1"', accept_ranges=True, cut_after=half),
                       FaultReply(body=body, etag='"big-1"', accept_ranges=True))
    cache = fault_open_cache(timeout=10.0, retries=2)
    resp = cache.fetch(fault_origin.url("/big.bin"))
    hits = fault_origin.hits("/big.bin", method=None)
    assert len(hits) == 2, [hit["headers"].get("range") for hit in hits]
    assert "range" not in hits[0]["headers"]
    start = _fault_range_start(hits[1])
    assert hits[1]["headers"].get("if-range") == '"big-1"'
    assert hits[1]["status"] == 206
    served = fault_origin.served_bytes("/big.bin")
    print(f"64 MiB resume: range start {start / _FAULT_MIB:.1f} MiB, "
          f"served {served / _FAULT_MIB:.1f} MiB")
    assert start >= 26 * _FAULT_MIB
    assert served < 70 * _FAULT_MIB
    assert resp.outcome == "downloaded" and resp.status == "ready"
    assert resp.content_hash_hex == sha256
    assert resp.content_attributes.content_size_bytes == len(body)
    assert _fault_stream_sha256(resp) == sha256


def test_resume_with_last_modified_validator(fault_origin, fault_open_cache):
    """§11: Last-Modified alone (no ETag) is enough to resume; If-Range carries it."""
    body = random.Random(7).randbytes(4 * _FAULT_MIB)
    stamp = "Wed, 21 Oct 2015 07:28:00 GMT"
    fault_origin.route("/lm.bin",
                       FaultReply(body=body, last_modified=stamp, accept_ranges=True,
                                  cut_after=3 * _FAULT_MIB, cut_how="reset"),
                       FaultReply(body=body, last_modified=stamp, accept_ranges=True))
    resp = fault_open_cache(timeout=5.0).fetch(fault_origin.url("/lm.bin"))
    hits = fault_origin.hits("/lm.bin")
    assert len(hits) == 2
    assert _fault_range_start(hits[1]) > 0
    assert hits[1]["headers"].get("if-range") == stamp
    assert resp.read() == body


@pytest.mark.parametrize("second", ["ignores_range", "changed_etag"])
def test_resume_answered_with_200_restarts_cleanly(second, fault_origin, fault_open_cache):
    """§11: a 200 to a ranged request (Range ignored, or If-Range no longer matches) restarts."""
    body = random.Random(8).randbytes(2 * _FAULT_MIB)
    new_body = random.Random(9).randbytes(2 * _FAULT_MIB + 123)
    first = FaultReply(body=body, etag='"one"', accept_ranges=True, cut_after=_FAULT_MIB)
    if second == "ignores_range":
        expected, again = body, FaultReply(body=body, etag='"one"')
    else:
        expected, again = new_body, FaultReply(body=new_body, etag='"two"', accept_ranges=True)
    fault_origin.route("/restart.bin", first, again)
    resp = fault_open_cache(timeout=5.0).fetch(fault_origin.url("/restart.bin"))
    hits = fault_origin.hits("/restart.bin")
    assert len(hits) == 2
    assert "range" in hits[1]["headers"]
    assert hits[1]["status"] == 200
    assert resp.read() == expected
    assert resp.content_hash_hex == hashlib.sha256(expected).hexdigest()


def test_resume_64mib_after_downloading_process_killed(fault_origin, fault_workers,
                                                       fault_open_cache, fault_cache_path):
    """§11/§10: kill -9 a process half-way through 64 MiB; a new Cache resumes the rest."""
    body, sha256 = _fault_big_body()
    half = len(body) // 2
    # The first answer slows to a drip after 32 MiB so that the kill lands in the middle.
    fault_origin.route("/big-kill.bin",
                       FaultReply(body=body, etag='"big-2"', accept_ranges=True,
                                  drip_after=half, drip_bytes=64 * 1024, drip_interval_sec=0.05),
                       FaultReply(body=body, etag='"big-2"', accept_ranges=True))
    url = fault_origin.url("/big-kill.bin")
    kwargs = {"timeout": 10.0, "retries": 1, "max_retry_wait": 1.0, "download_lease_sec": 1.0}
    proc = fault_workers.spawn({"mode": "fetch", "cache": str(fault_cache_path), "url": url,
                                "cache_kwargs": kwargs})
    deadline = time.monotonic() + 60
    while True:  # bounded by the deadline
        hits = fault_origin.hits("/big-kill.bin")
        if hits and hits[0]["bytes_sent"] >= half + 256 * 1024:
            break
        assert proc.poll() is None, fault_workers.stderr(proc)
        assert time.monotonic() < deadline, "the worker never reached half way"
        time.sleep(0.05)
    time.sleep(1.5)  # let the worker store what it received
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    first_sent = fault_origin.hits("/big-kill.bin")[0]["bytes_sent"]
    assert first_sent < len(body)

    cache = fault_open_cache(**kwargs)
    resp = cache.fetch(url)
    hits = fault_origin.hits("/big-kill.bin")
    assert len(hits) == 2, "exactly one request after the kill"
    start = _fault_range_start(hits[1])
    assert hits[1]["headers"].get("if-range") == '"big-2"'
    served = fault_origin.served_bytes("/big-kill.bin")
    print(f"64 MiB cross-process resume: killed after {first_sent / _FAULT_MIB:.1f} MiB, "
          f"range start {start / _FAULT_MIB:.1f} MiB, served {served / _FAULT_MIB:.1f} MiB")
    assert start >= 26 * _FAULT_MIB
    assert served < 70 * _FAULT_MIB
    assert resp.content_hash_hex == sha256
    assert _fault_stream_sha256(resp) == sha256
    assert _fault_integrity(fault_cache_path) == ["ok"]


def test_progress_reports_and_cancel_keeps_partial_for_resume(fault_origin, fault_open_cache):
    """§7/§11: progress sees the bytes; raising cancels (propagated), and the next fetch resumes."""
    body = random.Random(10).randbytes(8 * _FAULT_MIB)
    fault_origin.route("/cancel.bin", FaultReply(body=body, etag='"c"', accept_ranges=True))
    cache = fault_open_cache(timeout=5.0)
    url = fault_origin.url("/cancel.bin")
    calls = []

    class Cancelled(Exception):
        pass

    def progress(done, total):
        calls.append((done, total))
        if done >= 6 * _FAULT_MIB:
            raise Cancelled()

    with pytest.raises(Cancelled):
        cache.fetch(url, progress=progress)
    assert calls and all(total == len(body) for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert cache.versions(url) == []
    resp = cache.fetch(url)
    hits = fault_origin.hits("/cancel.bin")
    assert len(hits) == 2
    assert _fault_range_start(hits[1]) > 0, "the partial content was kept for a resume"
    assert resp.read() == body


# ---------------------------------------------------------------------------------------
# Sensitive headers (§11, issue 4 must-show #3)
# ---------------------------------------------------------------------------------------

_FAULT_SECRETS = {"Authorization": "Bearer SECRET-TOKEN-123",
                  "Cookie": "session=COOKIE-VALUE-456",
                  "X-Api-Key": "KEYVALUE789",
                  "Proxy-Authorization": "Basic PROXYSECRET000"}


def _fault_secret_leaks(path):
    data = _fault_file_bytes(path)
    needles = ["SECRET-TOKEN-123", "COOKIE-VALUE-456", "KEYVALUE789", "PROXYSECRET000"]
    return [needle for needle in needles if needle.encode() in data]


def test_sensitive_header_values_never_reach_the_file(fault_origin, fault_open_cache,
                                                      fault_cache_path):
    """§11: Authorization/Cookie/Proxy-Authorization/extra names: not in file or WAL in clear."""
    fault_origin.route("/secret", FaultReply(body=b"private data\n", etag='"s"'))
    url = fault_origin.url("/secret")
    cache = fault_open_cache(sensitive_headers=("X-Api-Key",))
    resp = cache.fetch(url, headers=_FAULT_SECRETS)
    assert resp.read() == b"private data\n"
    hit = fault_origin.hits("/secret")[0]
    assert hit["headers"]["authorization"] == _FAULT_SECRETS["Authorization"]  # really sent
    assert hit["headers"]["x-api-key"] == _FAULT_SECRETS["X-Api-Key"]
    assert Path(f"{fault_cache_path}-wal").exists(), "§10: WAL mode"
    assert _fault_secret_leaks(fault_cache_path) == []
    # Same headers: the same request (identity uses the digest); served from the cache.
    again = cache.fetch(url, headers=_FAULT_SECRETS)
    assert again.version == resp.version and len(fault_origin.hits("/secret")) == 1
    cache.close()
    assert _fault_secret_leaks(fault_cache_path) == []

    reopened = fault_open_cache(sensitive_headers=("X-Api-Key",))
    request = reopened.get_request(url, headers=_FAULT_SECRETS)
    assert request is not None
    assert "SECRET-TOKEN-123" not in json.dumps(request.model_dump(mode="json"))
    assert reopened.get(url, headers=_FAULT_SECRETS).version == resp.version
    reopened.close()
    assert _fault_secret_leaks(fault_cache_path) == []


def test_different_authorization_values_are_distinct_requests(fault_origin, fault_open_cache):
    """§11: sensitive values take part in the request identity."""
    fault_origin.route("/per-user", lambda record: FaultReply(
        body=record["headers"].get("authorization", "").encode()))
    cache = fault_open_cache()
    url = fault_origin.url("/per-user")
    alice = cache.fetch(url, headers={"Authorization": "Bearer alice"})
    bob = cache.fetch(url, headers={"Authorization": "Bearer bob"})
    assert len(fault_origin.hits("/per-user")) == 2
    assert (alice.read(), bob.read()) == (b"Bearer alice", b"Bearer bob")
    assert alice.request_id != bob.request_id
    assert len(cache.requests()) == 2
    assert cache.get(url, headers={"Authorization": "Bearer bob"}).read() == b"Bearer bob"
    assert cache.get_request(url, headers={"Authorization": "Bearer carol"}) is None


# ---------------------------------------------------------------------------------------
# Content attributes, download stats, Content-Encoding (§4, §11)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,headers,expected", [
    ("/dl/ignored.bin",
     {"Content-Disposition": "attachment; filename=\"plain.txt\"; "
                             "filename*=UTF-8''r%C3%A9sum%C3%A9%20final.txt"},
     "résumé final.txt"),
    ("/dl/ignored.bin",
     {"Content-Disposition": "attachment; filename*=UTF-8''%E2%82%AC-rates.csv; "
                             "filename=\"EUR-rates.csv\""},
     "€-rates.csv"),
    ("/dl/ignored.bin", {"Content-Disposition": 'attachment; filename="plain.txt"'},
     "plain.txt"),
    ("/files/report.pdf", {"Content-Type": "application/pdf"}, "report.pdf"),
    ("/files/", {"Content-Type": "application/json"}, ".json"),
], ids=["filename_star_after", "filename_star_before", "filename_only", "url_path",
        "media_type"])
def test_filename_from_headers_url_or_media_type(path, headers, expected, fault_origin,
                                                 fault_open_cache):
    """§11: filename* (RFC 6266) beats filename; else the URL path; else the media type."""
    fault_origin.route(path, FaultReply(body=b"{}", headers=headers))
    resp = fault_open_cache().fetch(fault_origin.url(path))
    filename = resp.content_attributes.filename
    if expected.startswith("."):
        assert filename and filename.endswith(expected) and "/" not in filename
    else:
        assert filename == expected
    if "Content-Disposition" in headers:
        assert resp.content_attributes.content_disposition == headers["Content-Disposition"]


def test_content_attributes_and_download_stats_filled(fault_origin, fault_open_cache):
    """§4/§11: attributes from the headers; download_stats bytes, total, state, timing."""
    body = b"x" * 200_000
    fault_origin.route("/stats.txt", FaultReply(
        body=body, etag='"st-1"', last_modified="Wed, 21 Oct 2015 07:28:00 GMT",
        headers={"Content-Type": "text/plain; charset=utf-8"}))
    before = time.time()
    resp = fault_open_cache().fetch(fault_origin.url("/stats.txt"))
    attributes, stats = resp.content_attributes, resp.download_stats
    assert attributes.media_type.startswith("text/plain")
    assert attributes.etag in ('"st-1"', "st-1")
    assert attributes.content_size_bytes == len(body)
    assert attributes.last_modified_datetime_utc == datetime.datetime(
        2015, 10, 21, 7, 28, tzinfo=datetime.timezone.utc)
    assert attributes.filename == "stats.txt"
    assert stats.downloaded_bytes == len(body)
    assert stats.total_bytes_to_download == len(body)
    assert stats.state == "finished"  # Buffy's ResponseDownloadStats.state words
    assert stats.error is None
    assert stats.download_running_duration_sec is not None and stats.download_running_duration_sec >= 0
    assert stats.avg_bytes_per_sec is not None and stats.avg_bytes_per_sec >= 0
    assert before - 1 <= stats.download_start_time_unix_ts <= time.time() + 1


def test_gzip_content_encoding_stores_decoded_bytes(fault_origin, fault_open_cache):
    """§11 (issue 4): Content-Encoding gzip is decoded; stored = what a browser saves."""
    body = b"hello gzip world\n" * 5000
    fault_origin.route("/gz.txt", FaultReply(body=body, gzip=True, etag='"gz"',
                                             headers={"Content-Type": "text/plain"}))
    resp = fault_open_cache().fetch(fault_origin.url("/gz.txt"))
    assert fault_origin.served_bytes("/gz.txt") < len(body)  # really compressed on the wire
    assert resp.read() == body
    assert resp.content_hash_hex == hashlib.sha256(body).hexdigest()
    assert resp.content_attributes.content_size_bytes == len(body)


# ---------------------------------------------------------------------------------------
# cron strategy and its optional extra (§2, §6)
# ---------------------------------------------------------------------------------------


def _fault_cron_config(run_at_start):
    return _fault_config(buffylite.ReCachingStrategy.cron(cron="* * * * *",
                                                          run_at_start=run_at_start))


def _fault_tick_since(moment):
    """Whether a '* * * * *' tick (a minute boundary) lies after ``moment``, up to now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(second=0, microsecond=0) > moment


def test_cron_strategy_with_croniter(fault_origin, fault_open_cache):
    """§6: cron downloads when a tick passed since the last check, and once per opened Cache."""
    pytest.importorskip("croniter")
    fault_origin.route("/cron.txt", FaultReply(body=b"scheduled\n"))
    url = fault_origin.url("/cron.txt")
    cache = fault_open_cache()
    first = cache.fetch(url, cache_configuration=_fault_cron_config(False))
    assert first.outcome == "downloaded"
    second = cache.fetch(url, cache_configuration=_fault_cron_config(False))
    if not _fault_tick_since(first.validated_datetime_utc):
        assert second.outcome == "cached"
        assert len(fault_origin.hits("/cron.txt")) == 1
    hits = len(fault_origin.hits("/cron.txt"))
    other = fault_open_cache()  # run_at_start: once per opened Cache
    third = other.fetch(url, cache_configuration=_fault_cron_config(True))
    assert third.outcome in ("duplicate", "not_modified")
    assert third.version == first.version
    assert len(fault_origin.hits("/cron.txt")) == hits + 1
    fourth = other.fetch(url)
    if not _fault_tick_since(third.validated_datetime_utc):
        assert fourth.outcome == "cached"
        assert len(fault_origin.hits("/cron.txt")) == hits + 1


def test_cron_without_croniter_names_the_extra(fault_origin, fault_env, tmp_path):
    """§2/§6: without croniter, import works; using cron raises an error naming buffylite[cron]."""
    fault_origin.route("/cron-missing.txt", FaultReply(body=b"x"))
    code = textwrap.dedent('''
        import json, sys
        sys.modules["croniter"] = None  # as if the extra were not installed
        import buffylite
        out = {"stage": "construct"}
        try:
            strategy = buffylite.ReCachingStrategy.cron(cron="* * * * *")
            config = buffylite.RequestCacheConfiguration(recaching_strategy=strategy)
            out["stage"] = "fetch"
            with buffylite.Cache(sys.argv[1], timeout=1, retries=0) as cache:
                cache.fetch(sys.argv[2], cache_configuration=config)
                cache.fetch(sys.argv[2], cache_configuration=config)
            out["error"] = None
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        with buffylite.Cache(sys.argv[1] + ".plain", timeout=1, retries=0) as cache:
            out["plain"] = cache.fetch(sys.argv[2]).read().decode()
        print(json.dumps(out))
    ''')
    env = dict(os.environ, PYTHONPATH=str(_FAULT_HERE))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.sqlite3"),
                           fault_origin.url("/cron-missing.txt")],
                          capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["plain"] == "x", "the module works without the optional extra"
    assert out["error"], "using cron without croniter must fail"
    assert "buffylite[cron]" in out["error"], out


# ---------------------------------------------------------------------------------------
# Concurrency and crash safety (§7 single flight, §10; issue 5)
# ---------------------------------------------------------------------------------------


def test_single_flight_8_threads_and_3_processes_one_upstream_get(
        fault_origin, fault_open_cache, fault_workers, fault_cache_path):
    """§7/§10: 8 threads + 3 processes, one uncached URL, slow origin: one GET, one version."""
    body = b"worth the wait\n" * 1000
    fault_origin.route("/slow", FaultReply(body=body, etag='"slow"', delay_sec=2.0))
    url = fault_origin.url("/slow")
    kwargs = {"timeout": 10.0, "retries": 0, "max_retry_wait": 1.0, "download_lease_sec": 10.0}
    cache = fault_open_cache(**kwargs)  # creates the file before the processes open it
    procs = [fault_workers.spawn({"mode": "fetch", "cache": str(fault_cache_path), "url": url,
                                  "wait_go": True, "cache_kwargs": kwargs}) for _ in range(3)]
    for proc in procs:
        fault_workers.read_line(proc, "READY", 30)
    barrier = threading.Barrier(9)
    results = [None] * 8

    def fetch_in_thread(index):
        barrier.wait(10)
        try:
            resp = cache.fetch(url)
            results[index] = (resp.version, resp.read())
        except Exception as exc:  # reported by the assertion below
            results[index] = exc

    threads = [threading.Thread(target=fetch_in_thread, args=(i,), daemon=True)
               for i in range(8)]
    for thread in threads:
        thread.start()
    barrier.wait(10)
    for proc in procs:
        fault_workers.go(proc)
    for thread in threads:
        thread.join(60)
    outputs = [fault_workers.result(proc, 60) for proc in procs]
    assert not any(thread.is_alive() for thread in threads)
    assert all(isinstance(result, tuple) for result in results), results
    assert all("error" not in output for output in outputs), outputs
    versions = {version for version, _ in results} | {output["version"] for output in outputs}
    assert len(versions) == 1, versions
    assert all(content == body for _, content in results)
    assert {output["sha256"] for output in outputs} == {hashlib.sha256(body).hexdigest()}
    assert len(fault_origin.hits("/slow")) == 1, "single flight: exactly one upstream GET"


def test_kill9_at_random_moments_keeps_cache_consistent(
        fault_origin, fault_open_cache, fault_workers, fault_cache_path, capsys):
    """§10: 25 rounds of SIGKILL during a download: integrity, last good served, hashes, GC."""
    rounds = 25
    rng = random.Random(1234)
    lease_sec = 0.5
    kwargs = {"timeout": 2.0, "retries": 0, "max_retry_wait": 1.0,
              "download_lease_sec": lease_sec}
    contents = {}
    current = {"round": -1}

    def content_for(round_index):
        seed = f"round {round_index}\n".encode()
        return (seed * (48 * 1024 // len(seed) + 1))[:48 * 1024]

    def reply(record):
        index = current["round"]
        body = content_for(index)
        contents[hashlib.sha256(body).hexdigest()] = body
        drip = {} if index < 0 else {"drip_after": 0, "drip_bytes": 2048,
                                     "drip_interval_sec": 0.01}
        return FaultReply(body=body, etag=f'"r{index}"', accept_ranges=True, **drip)

    fault_origin.route("/drip.bin", reply)
    url = fault_origin.url("/drip.bin")
    cache = fault_open_cache(**kwargs)
    first = cache.fetch(url, cache_configuration=_fault_when_requested())
    assert first.outcome == "downloaded"

    def spawn():
        return fault_workers.spawn({"mode": "fetch", "cache": str(fault_cache_path),
                                    "url": url, "strategy": "when_requested", "wait_go": True,
                                    "cache_kwargs": kwargs})

    problems = {}
    clean = mid_download = 0
    upcoming = spawn()
    for round_index in range(rounds):
        current["round"] = round_index
        proc, upcoming = upcoming, None
        fault_workers.read_line(proc, "READY", 30)
        previous = cache.get(url)
        hits_before = len(fault_origin.hits("/drip.bin"))
        fault_workers.go(proc)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(10)
        upcoming = spawn() if round_index + 1 < rounds else None  # warms up meanwhile
        round_hits = fault_origin.hits("/drip.bin")[hits_before:]
        if round_hits and round_hits[-1]["bytes_sent"] < 48 * 1024:
            mid_download += 1

        found = []
        integrity = _fault_integrity(fault_cache_path)
        if integrity != ["ok"]:
            found.append(f"integrity_check: {integrity[:3]}")
        served = cache.fetch(url, offline=True)
        if served.outcome != "offline" or served.version < previous.version:
            found.append(f"served {served.version}/{served.outcome} after {previous.version}")
        if served.read() not in contents.values():
            found.append(f"served {served.version} with unknown content")
        found += _fault_invariant_problems(cache, url)
        for row in cache.versions(url):
            if row.read() not in contents.values():
                found.append(f"ready {row.version} has content nobody served")
        time.sleep(max(0.0, killed_at + lease_sec + 0.3 - time.monotonic()))
        cache.gc()
        leftovers = [(row.version, row.status) for row in cache.versions(url, status=None)
                     if row.status in ("wait", "in_progress")]
        if leftovers:
            found.append(f"after gc(): abandoned rows {leftovers}")
        if found:
            problems[round_index] = found
        else:
            clean += 1

    assert cache.verify().corrupted == []
    with capsys.disabled():
        print(f"\nkill -9 harness: {clean}/{rounds} rounds clean "
              f"({mid_download} kills landed mid-download)")
    assert problems == {}
    assert clean == rounds


def test_mixed_load_three_processes_no_errors(fault_origin, fault_open_cache, fault_workers,
                                              fault_cache_path):
    """§10: 3 processes fetch/pin/tag/gc/verify one (fresh) file for ~3 s: zero errors."""
    counter = itertools.count()

    def changing(record):
        return FaultReply(body=(b"mixed content %d\n" % (next(counter) % 3)) * 300,
                          headers={"Content-Type": "text/plain"})

    paths = [f"/mix/{index}" for index in range(3)]
    for path in paths:
        fault_origin.route(path, changing)
    urls = [fault_origin.url(path) for path in paths]
    kwargs = {"timeout": 5.0, "retries": 1, "max_retry_wait": 1.0, "download_lease_sec": 5.0}
    procs = [fault_workers.spawn({"mode": "mixed", "cache": str(fault_cache_path), "urls": urls,
                                  "seed": seed, "duration_sec": 3.0, "wait_go": True,
                                  "cache_kwargs": kwargs}) for seed in range(3)]
    for proc in procs:
        fault_workers.read_line(proc, "READY", 30)
    for proc in procs:
        fault_workers.go(proc)
    outputs = [fault_workers.result(proc, 60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    print("mixed load:", json.dumps(outputs))
    assert [output["error_count"] for output in outputs] == [0, 0, 0], outputs
    assert sum(sum(output["ops"].values()) for output in outputs) >= 30
    assert all(output["ops"].get("fetch") for output in outputs)

    assert _fault_integrity(fault_cache_path) == ["ok"]
    cache = fault_open_cache(**kwargs)
    assert cache.verify().corrupted == []
    cache.gc()
    for url in urls:
        assert _fault_invariant_problems(cache, url) == []
        rows = cache.versions(url, status=None)
        assert not [row for row in rows if row.status in ("wait", "in_progress", "duplicate")]
        assert len([row for row in rows if row.status == "failed"]) <= 1
        assert cache.versions(url), "every URL has a ready version"
