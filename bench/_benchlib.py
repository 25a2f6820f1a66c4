"""Shared pieces of the bench scripts (not a benchmark itself).

- ``BenchHandler``: ``origin.Handler`` (deterministic streamed bodies, ETag, Range at
  ``/bytes/N?seed=S``) plus the few routes the scripts need, and a per-path request
  counter so a script can ask the origin how many GETs it served:

  ``/changing/N?key=K&every=E&chunked=0|1``
      N bytes whose content changes every E-th request for key K (default E=1: every
      request); ETag ``"K-generation"`` and a 304 for a matching ``If-None-Match``;
      ``chunked=1`` sends it with ``Transfer-Encoding: chunked`` (no Content-Length).
  ``/flaky/N?key=K&fail=P&every=E``
      like ``/changing`` but answers 503 with probability P (seeded per request count).
  ``/slow/N?seed=S&ms=T``
      the body of ``/bytes/N?seed=S`` dripped in 16 pieces over about T milliseconds
      (headers sent at once): a download that stays in flight long enough for others
      to arrive (single flight).
  ``/_counts``
      JSON ``{"path?query": GETs served}`` for every route above; ``/_reset`` zeroes it.

  Only loopback: the server binds 127.0.0.1.

- ``start_origin()``: runs that origin in a subprocess (its CPU time and memory are not
  the measured process's) and returns ``(process, base_url)``; ``origin_counts()``.
- Small statistics and table helpers, ``vm_hwm_kib()`` (peak RSS from /proc/self/status).
- ``postgres_server()``: a throwaway PostgreSQL for one benchmark run (or an existing
  server named by ``--postgres-url`` / ``$BUFFYLITE_BENCH_POSTGRES_URL``), as a context
  manager yielding a ``PostgresServer`` with a ``url(schema)`` method.

Run as a script it serves until killed and prints its port on the first line:
``python bench/_benchlib.py``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pathlib
import contextlib
import dataclasses
import random
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import origin  # noqa: E402  (bench/origin.py: bodies, ETag, Range)

#: Bytes per piece of a dripped (``/slow``) body.
SLOW_PIECES = 16


class BenchHandler(origin.Handler):
    """origin.Handler plus ``/changing``, ``/flaky``, ``/slow``, ``/_counts`` and ``/_reset``."""

    # Small responses are written as header + body: without TCP_NODELAY the second
    # write can wait for a delayed ACK (~40 ms) on loopback. Every real server sets it.
    disable_nagle_algorithm = True
    path_counts: dict[str, int] = {}
    generations: dict[str, int] = {}
    lock = threading.Lock()

    def _count(self) -> int:
        with BenchHandler.lock:
            BenchHandler.path_counts[self.path] = BenchHandler.path_counts.get(self.path, 0) + 1
            return BenchHandler.path_counts[self.path]

    def _send_body(self, body_iter, *, length: int | None, etag: str | None, chunked: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if etag:
            self.send_header("ETag", etag)
        if chunked or length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        for piece in body_iter:
            if chunked or length is None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
        if chunked or length is None:
            self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):  # noqa: N802 - http.server's name
        parts = urllib.parse.urlsplit(self.path)
        query = {key: values[-1] for key, values in urllib.parse.parse_qs(parts.query).items()}
        match = re.match(r"^/(changing|flaky|slow)/(\d+)$", parts.path)
        if parts.path == "/_counts":
            with BenchHandler.lock:
                data = json.dumps(BenchHandler.path_counts).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if parts.path == "/_reset":
            with BenchHandler.lock:
                BenchHandler.path_counts.clear()
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not match:
            self._count()
            return super().do_GET()
        route, size = match.group(1), int(match.group(2))
        self._count()
        seed = int(query.get("seed", 0))
        if route == "slow":
            pause = int(query.get("ms", 1000)) / 1000 / SLOW_PIECES
            piece_size = max(1, -(-size // SLOW_PIECES))

            def dripped():
                data = b"".join(origin.body_bytes(size, seed))
                for start in range(0, size, piece_size):
                    time.sleep(pause)
                    yield data[start:start + piece_size]
            self._send_body(dripped(), length=size, etag=f'"slow-{size}-{seed}"', chunked=False)
            return
        # changing / flaky: content generation = requests for this key // every
        key = query.get("key", "k")
        every = max(1, int(query.get("every", 1)))
        with BenchHandler.lock:
            served = BenchHandler.generations.get(key, 0)
            BenchHandler.generations[key] = served + 1
        if route == "flaky":
            chance = float(query.get("fail", 0.3))
            if random.Random(f"{key}:{served}").random() < chance:
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        generation = served // every
        etag = f'"{key}-{generation}"'
        if self.answered_not_modified(etag):
            return
        digest = int.from_bytes(hashlib.sha256(f"{key}:{generation}".encode()).digest()[:6], "big")
        self._send_body(origin.body_bytes(size, digest), length=size, etag=etag,
                        chunked=query.get("chunked") == "1")


def serve(port: int = 0) -> http.server.ThreadingHTTPServer:
    """Start the bench origin in a daemon thread of this process (127.0.0.1 only)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), BenchHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_origin() -> tuple[subprocess.Popen, str]:
    """Run the bench origin in a subprocess; returns (process, "http://127.0.0.1:PORT")."""
    process = subprocess.Popen([sys.executable, str(HERE / "_benchlib.py")],
                               stdout=subprocess.PIPE, text=True)
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}"


def stop_origin(process: subprocess.Popen) -> None:
    """End the origin subprocess started by ``start_origin`` (only that process)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def origin_counts(base_url: str) -> dict[str, int]:
    """GETs served per path+query so far (loopback request to ``/_counts``)."""
    with urllib.request.urlopen(base_url + "/_counts", timeout=10) as reply:
        return json.loads(reply.read())


def vm_hwm_kib() -> int:
    """Peak resident set size of this process (VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(headers: list[str], rows: list[list[str]], out=sys.stdout, align: str = "") -> None:
    """A plain text table. ``align``: one letter per column, ``l`` or ``r``; by default the
    first column is aligned left and the others right."""
    widths = [max(len(str(row[i])) for row in [headers] + rows) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells):
        return "  ".join(str(cell).ljust(widths[i]) if align[i] == "l" else str(cell).rjust(widths[i])
                         for i, cell in enumerate(cells)).rstrip()
    print(line(headers), file=out)
    print("  ".join("-" * width for width in widths), file=out)
    for row in rows:
        print(line(row), file=out)
    out.flush()


def machine_description() -> str:
    """One line: CPU model, cores, memory, Python and SQLite versions."""
    import platform
    import sqlite3
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM; Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}")


# ---------------------------------------------------------------------------
# PostgreSQL for a benchmark run
# ---------------------------------------------------------------------------

#: Where Debian/Ubuntu put the PostgreSQL 15 server binaries (initdb, pg_ctl).
POSTGRES_BIN_DIR = "/usr/lib/postgresql/15/bin"
#: The environment variable naming an existing server instead of a throwaway one.
POSTGRES_URL_ENV = "BUFFYLITE_BENCH_POSTGRES_URL"
#: Upper bound for initdb, start and stop of the throwaway server, each.
POSTGRES_START_TIMEOUT_SEC = 60


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL could be started or reached; the message says why."""


@dataclasses.dataclass
class PostgresServer:
    """A PostgreSQL server a benchmark may use: ``base_url`` has no schema parameter.

    ``description`` says what it is (version, throwaway or given); ``owned`` is True
    for a server this run started (and stops). Schemas made through ``url()`` are
    remembered so ``drop_schemas()`` can remove them from a server that is not ours.
    """

    base_url: str
    description: str
    owned: bool
    schemas: list = dataclasses.field(default_factory=list)

    def url(self, schema: str) -> str:
        """``base_url`` with ``?schema=NAME`` (or ``&schema=``) appended; remembers ``schema``."""
        self.schemas.append(schema)
        return self.base_url + ("&" if "?" in self.base_url else "?") + "schema=" + schema

    def connect(self, **options):
        """A psycopg connection to the server's database (the URL without buffylite's
        ``schema`` parameter, which libpq does not know)."""
        import psycopg
        return psycopg.connect(_libpq_url(self.base_url), **options)

    def drop_schema(self, schema: str) -> None:
        """Drop one schema handed out by ``url()`` now (frees its space between rounds)."""
        with self.connect(autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if schema in self.schemas:
            self.schemas.remove(schema)

    def drop_schemas(self) -> None:
        """Drop every schema handed out by ``url()`` (a given server keeps no bench data)."""
        if not self.schemas:
            return
        with self.connect(autocommit=True) as connection:
            for schema in self.schemas:
                connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.schemas.clear()


def _libpq_url(url: str) -> str:
    """``url`` without a ``schema=`` query parameter (libpq rejects unknown ones)."""
    parts = urllib.parse.urlsplit(url)
    query = [(key, value) for key, value in urllib.parse.parse_qsl(parts.query) if key != "schema"]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres_user(command: list[str]) -> list[str]:
    """``command`` run as the ``postgres`` account when we are root (the server refuses root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run_bounded(command: list[str], what: str, log_path: pathlib.Path | None = None) -> None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True,
                                   timeout=POSTGRES_START_TIMEOUT_SEC)
    except subprocess.TimeoutExpired as exc:
        raise PostgresUnavailable(f"{what} did not finish within {POSTGRES_START_TIMEOUT_SEC} s.") from exc
    except OSError as exc:
        raise PostgresUnavailable(f"{what} could not run: {exc}.") from exc
    if completed.returncode != 0:
        log = ""
        if log_path is not None and log_path.exists():
            log = " Server log: " + log_path.read_text(errors="replace").strip()[-400:]
        raise PostgresUnavailable(f"{what} failed (exit {completed.returncode}): "
                                  f"{(completed.stderr or completed.stdout).strip()[-400:]}{log}")


@contextlib.contextmanager
def postgres_server(url: str | None = None, bin_dir: str = POSTGRES_BIN_DIR):
    """Yield a ``PostgresServer`` for one benchmark run; raise ``PostgresUnavailable`` if none.

    ``url`` (else ``$BUFFYLITE_BENCH_POSTGRES_URL``) names an existing server
    (``postgresql://user:password@host:port/db``): it is only checked and used, and
    the schemas handed out by ``url()`` are dropped at the end. Without one, a
    throwaway server is made in a temporary directory: ``initdb`` and ``pg_ctl`` from
    ``bin_dir``, run as the ``postgres`` account when we are root, listening on a free
    port of 127.0.0.1 only (its Unix socket in the same directory), a role with a
    random password and a database it owns; every other setting is the default
    (``fsync`` and ``synchronous_commit`` on: durable, like the SQLite contenders).
    It is stopped and its directory removed at the end. Every wait is bounded.
    """
    url = url or os.environ.get(POSTGRES_URL_ENV)
    if url:
        server = PostgresServer(url, "", owned=False)
        try:
            with server.connect(connect_timeout=10) as connection:
                version = connection.execute("SHOW server_version").fetchone()[0]
        except Exception as exc:  # noqa: BLE001 - any driver or network failure means "unavailable"
            raise PostgresUnavailable(f"The given PostgreSQL server could not be reached: "
                                      f"{type(exc).__name__}: {_without_password(str(exc), url)}") from exc
        server.description = f"PostgreSQL {version} (given server)"
        try:
            yield server
        finally:
            server.drop_schemas()
        return
    yield from _throwaway_postgres(bin_dir)


def hide_password(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` in it shown as ``***``."""
    return re.sub(r"(://[^:/@\s]+:)[^\s/]*@", r"\1***@", text)


def _without_password(text: str, url: str) -> str:
    password = urllib.parse.urlsplit(url).password
    return text.replace(password, "***") if password else text


def _throwaway_postgres(bin_dir: str):
    """The generator behind ``postgres_server()`` when no server was given."""
    try:
        import psycopg
    except ImportError as exc:
        raise PostgresUnavailable("psycopg (the buffylite[postgres] extra) is not installed.") from exc
    bin_path = pathlib.Path(bin_dir)
    if not (bin_path / "initdb").exists() or not (bin_path / "pg_ctl").exists():
        raise PostgresUnavailable(f"No PostgreSQL server binaries in {bin_dir} (initdb, pg_ctl).")
    root = pathlib.Path(tempfile.mkdtemp(prefix="buffylite-bench-pg-"))
    data, log_path = root / "data", root / "server.log"
    started = False
    try:
        if os.geteuid() == 0:
            try:
                shutil.chown(root, user="postgres", group="postgres")
            except (LookupError, OSError) as exc:
                raise PostgresUnavailable(f"The server refuses to run as root and there is no usable "
                                          f"'postgres' account: {exc}.") from exc
        # The bootstrap superuser connects through the Unix socket in our directory only;
        # TCP connections (the benchmark's) must give the role's password.
        _run_bounded(_as_postgres_user([str(bin_path / "initdb"), "-D", str(data), "-U", "postgres",
                                        "--auth-local=trust", "--auth-host=scram-sha-256",
                                        "--encoding=UTF8", "--no-instructions"]), "initdb")
        port = _free_loopback_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}")
        _run_bounded(_as_postgres_user([str(bin_path / "pg_ctl"), "-D", str(data), "-l", str(log_path),
                                        "-o", options, "-w", "-t", str(POSTGRES_START_TIMEOUT_SEC),
                                        "start"]), "pg_ctl start", log_path)
        started = True
        password = secrets.token_hex(12)
        try:
            with psycopg.connect(host=str(root), port=port, user="postgres", dbname="postgres",
                                 autocommit=True, connect_timeout=10) as admin:
                admin.execute(f"CREATE ROLE bench LOGIN PASSWORD '{password}'")
                admin.execute("CREATE DATABASE bench OWNER bench")
                # Lets a benchmark start each timed phase from a fresh checkpoint (PostgreSQL 15+).
                admin.execute("GRANT pg_checkpoint TO bench")
                version = admin.execute("SHOW server_version").fetchone()[0]
        except psycopg.Error as exc:
            raise PostgresUnavailable(f"The throwaway server started but could not be set up: {exc}") from exc
        server = PostgresServer(f"postgresql://bench:{password}@127.0.0.1:{port}/bench",
                                f"PostgreSQL {version} (throwaway server, default settings, fsync on)",
                                owned=True)
        yield server
    finally:
        if started:
            try:
                _run_bounded(_as_postgres_user([str(bin_path / "pg_ctl"), "-D", str(data), "-m", "fast",
                                                "-w", "-t", str(POSTGRES_START_TIMEOUT_SEC), "stop"]),
                             "pg_ctl stop")
            except PostgresUnavailable:
                _kill_postmaster(data)
        shutil.rmtree(root, ignore_errors=True)


def _kill_postmaster(data: pathlib.Path) -> None:
    """Last resort when ``pg_ctl stop`` failed: SIGKILL the postmaster we started (its pid
    is the first line of ``postmaster.pid``) and wait a bounded time for it to go."""
    import signal
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)


if __name__ == "__main__":
    server = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(server.server_port, flush=True)
    threading.Event().wait()
