"""A loopback origin for the benchmarks: deterministic bodies of any size, streamed
(never held in memory), with ETag, Last-Modified and Range support.

Run as a script it serves until killed and prints its port on the first line:
``python bench/origin.py`` ; a body of N bytes lives at ``/bytes/N`` (add
``?seed=S`` for other content). ``/noise/N`` (also with ``?seed=S``) serves bytes no
compressor can shrink, like the archives and images most downloads are: a store that
compresses (PostgreSQL's TOAST does by default) gains nothing from it, as in real use,
while the repeating ``/bytes`` bodies would shrink to almost nothing.
"""

import functools
import hashlib
import http.server
import re
import sys
import threading

BLOCK_BYTES = 1 << 20


def block(seed: int, index: int) -> bytes:
    """The index-th 1 MiB block of a body: cheap to make, different everywhere."""
    head = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return (head * (BLOCK_BYTES // len(head)))[:BLOCK_BYTES]


#: Distinct 1 MiB blocks of a ``/noise`` body; block i repeats block i mod this. Any
#: compressor looks at one chunk or a small window at a time, so it never sees the repeat;
#: and the origin computes a few blocks per body instead of every block.
NOISE_DISTINCT_BLOCKS = 16


def noise_block(seed: int, index: int) -> bytes:
    """The index-th 1 MiB block of a ``/noise`` body: SHAKE-128 output, incompressible."""
    return _distinct_noise_block(seed, index % NOISE_DISTINCT_BLOCKS)


@functools.lru_cache(maxsize=2 * NOISE_DISTINCT_BLOCKS)
def _distinct_noise_block(seed: int, distinct_index: int) -> bytes:
    return hashlib.shake_128(f"noise:{seed}:{distinct_index}".encode()).digest(BLOCK_BYTES)


def body_bytes(size: int, seed: int = 0, start: int = 0, noise: bool = False):
    """Yield the bytes [start, size) of the body in pieces of at most 1 MiB (``noise``:
    of the ``/noise`` body)."""
    if noise and size <= BLOCK_BYTES:
        # A prefix of block 0 (SHAKE output of any length starts with the shorter one),
        # made without computing a whole MiB for a small body.
        yield hashlib.shake_128(f"noise:{seed}:0".encode()).digest(size)[start:]
        return
    position = start
    while position < size:
        index, offset = divmod(position, BLOCK_BYTES)
        piece = (noise_block if noise else block)(seed, index)[offset:offset + (size - position)]
        yield piece
        position += len(piece)


def body_sha256(size: int, seed: int = 0, noise: bool = False) -> str:
    digest = hashlib.sha256()
    for piece in body_bytes(size, seed, noise=noise):
        digest.update(piece)
    return digest.hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    counts = {"requests": 0, "bytes": 0}

    def log_message(self, *args):
        pass

    def answered_not_modified(self, etag: str) -> bool:
        """Answer 304 when the request's If-None-Match names ``etag``; say whether it did."""
        if self.headers.get("If-None-Match") != etag:
            return False
        self.send_response(304)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_GET(self):
        match = re.match(r"^/(bytes|noise)/(\d+)(?:\?seed=(\d+))?$", self.path)
        if not match:
            self.send_error(404)
            return
        noise, size, seed = match.group(1) == "noise", int(match.group(2)), int(match.group(3) or 0)
        etag = f'"{match.group(1)}-{size}-{seed}"' if noise else f'"{size}-{seed}"'
        Handler.counts["requests"] += 1
        if self.answered_not_modified(etag):
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and self.headers.get("If-Range", etag) == etag:
            start = int(re.match(r"bytes=(\d+)-", range_header).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", "Sun, 01 Nov 2026 00:00:00 GMT")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        for piece in body_bytes(size, seed, start, noise):
            self.wfile.write(piece)
            Handler.counts["bytes"] += len(piece)


def serve(port: int = 0) -> http.server.ThreadingHTTPServer:
    """Start the origin in a daemon thread; returns the server (``server_port``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    server = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(server.server_port, flush=True)
    threading.Event().wait()
