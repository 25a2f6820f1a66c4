"""Download a large body through buffylite, read it back through ``open()``, and
report throughput and the process's peak RSS (memory must stay bounded).

    python bench/large_download.py [--size-mib 256]

The origin runs in its own process so its memory is not counted here.
"""

import argparse
import hashlib
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import buffylite  # noqa: E402
from origin import body_sha256  # noqa: E402


def peak_rss_mib() -> float:
    """VmHWM of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    size = args.size_mib << 20
    origin = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).parent / "origin.py")],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(origin.stdout.readline())
        url = f"http://127.0.0.1:{port}/bytes/{size}"
        with tempfile.TemporaryDirectory() as directory:
            rss_start = peak_rss_mib()
            with buffylite.Cache(os.path.join(directory, "cache.sqlite3")) as cache:
                started = time.perf_counter()
                response = cache.fetch(url)
                download_sec = time.perf_counter() - started
                rss_after_download = peak_rss_mib()
                started = time.perf_counter()
                digest = hashlib.sha256()
                with response.open() as stream:
                    while piece := stream.read(1 << 20):
                        digest.update(piece)
                read_sec = time.perf_counter() - started
                assert digest.hexdigest() == response.content_hash_hex == body_sha256(size), "content mismatch"
                file_size = cache.stats()["file_size_bytes"]
        print(f"body                 {args.size_mib} MiB, sha256 verified")
        print(f"download             {download_sec:6.2f} s   {args.size_mib / download_sec:7.1f} MiB/s")
        print(f"read-back (open)     {read_sec:6.2f} s   {args.size_mib / read_sec:7.1f} MiB/s (incl. sha256)")
        print(f"cache file           {file_size / 2**20:7.1f} MiB")
        print(f"peak RSS at start    {rss_start:7.1f} MiB (interpreter + imports)")
        print(f"peak RSS download    {rss_after_download:7.1f} MiB")
        print(f"peak RSS overall     {peak_rss_mib():7.1f} MiB")
    finally:
        origin.kill()


if __name__ == "__main__":
    main()
