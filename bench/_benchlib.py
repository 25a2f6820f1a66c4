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

Run as a script it serves until killed and prints its port on the first line:
``python bench/_benchlib.py``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
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


if __name__ == "__main__":
    server = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(server.server_port, flush=True)
    threading.Event().wait()
