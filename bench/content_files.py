"""Content as files: materialise a large content with ``as_file()`` and read it at random
offsets through ``open()``, reporting time and the peak RSS growth of the process doing it.

    python bench/content_files.py [--size-mib 256] [--seeks 2000]

The download runs in this process; the measurements run in a fresh child process, so
its peak RSS (VmHWM) starts from the interpreter and imports only. The origin runs in
its own process too.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import buffylite  # noqa: E402
from _benchlib import start_origin, stop_origin  # noqa: E402
from origin import body_sha256  # noqa: E402

#: What the child process runs: argv = cache path, URL, number of random reads.
CHILD = """
import hashlib, random, sys, time
sys.path.insert(0, "bench")
import buffylite
from _benchlib import vm_hwm_kib
with buffylite.Cache(sys.argv[1]) as cache:
    response = cache.get(sys.argv[2])
    with response.open() as stream:
        stream.read(1 << 20)
    before = vm_hwm_kib()
    started = time.perf_counter()
    path = response.as_file()
    first = time.perf_counter() - started
    after = vm_hwm_kib()
    started = time.perf_counter()
    assert response.as_file() == path
    second = time.perf_counter() - started
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(1 << 20):
            digest.update(piece)
    rng = random.Random(7)
    size = path.stat().st_size
    started = time.perf_counter()
    with response.open() as stream:
        for _ in range(int(sys.argv[3])):
            stream.seek(rng.randrange(size))
            stream.read(4096)
    seeks = time.perf_counter() - started
    after_seeks = vm_hwm_kib()
print(first, second, (after - before) / 1024, seeks, (after_seeks - before) / 1024, digest.hexdigest())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seeks", type=int, default=2000)
    args = parser.parse_args()
    size = args.size_mib << 20
    process, base_url = start_origin()
    try:
        url = f"{base_url}/bytes/{size}"
        with tempfile.TemporaryDirectory() as directory:
            cache_path = os.path.join(directory, "cache.sqlite3")
            with buffylite.Cache(cache_path) as cache:
                cache.fetch(url)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, cache_path, url, str(args.seeks)],
                                  cwd=pathlib.Path(__file__).resolve().parent.parent,
                                  capture_output=True, text=True, timeout=600, check=True)
            wall = time.perf_counter() - started
        first, second, growth, seeks, seek_growth, digest = done.stdout.split()
        assert digest == body_sha256(size), "the materialised file does not hold the content"
        print(f"content                  {args.size_mib} MiB, sha256 of the file verified")
        print(f"as_file() first call     {float(first):7.2f} s   {args.size_mib / float(first):7.1f} MiB/s "
              "(streamed from SQLite, hashed, fsynced)")
        print(f"as_file() second call    {float(second) * 1e3:7.3f} ms  (same file, no rewrite)")
        print(f"peak RSS growth as_file  {float(growth):7.1f} MiB")
        print(f"{args.seeks} random 4 KiB reads via open()  {float(seeks):6.2f} s   "
              f"{float(seeks) / args.seeks * 1e6:7.0f} us each")
        print(f"peak RSS growth overall  {float(seek_growth):7.1f} MiB")
        print(f"child process wall time  {wall:7.2f} s")
    finally:
        stop_origin(process)


if __name__ == "__main__":
    main()
