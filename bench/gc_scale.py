"""Time ``gc()`` of one request holding 1,000 versions, in a cache of 10 requests and in a
cache of 10,000 requests, and print the ratio (target < 1.5).

    .venv/bin/python bench/gc_scale.py            # full: 1,000 versions, 10 vs 10,000 requests
    .venv/bin/python bench/gc_scale.py --quick    # under a minute: 300 versions, 10 vs 2,000

SPEC §10: the GC's "cost grows with the versions it inspects, not with the cache size".
So the work must be the same in both caches and only the cache around it may differ.
How this script makes that so:

1. *One* measured request is built once, through the public API, against a loopback
   origin whose content changes on every request: ``age(seconds=0)`` and
   ``max_cached_unpinned_versions=1000``, fetched 1,000 times -> 1,000 ready versions,
   each with its own content (so the GC also deletes 999 contents and their chunks).
   Nine filler requests are added: that is the small cache.
2. Its configuration is then lowered to ``max_cached_unpinned_versions=1`` by one more
   fetch under ``never`` (served from the cache: no version row is created, so no GC
   runs); 999 versions are now removable, and the script checks they are still there.
3. The small cache file is copied and 9,990 more filler requests (3 versions each,
   through the public API) are added to the copy: the big cache. The measured request's
   rows and content are therefore byte-for-byte the same in both files.
4. Each round copies each template to a fresh working file (so every timed gc starts
   from the same state, its WAL checkpointed and the file in the OS page cache), opens a
   ``Cache`` on it, warms the connection with ``get(url)``, and times ``cache.gc(url)``
   -- everything gc does: reading the request's rows, deleting 999 versions and their
   contents, giving free pages back (incremental vacuum) and the WAL checkpoint. The
   order of the two caches alternates each round; a first round is run untimed; the
   ratio is computed inside each round and the median over rounds is reported. Both
   reports (versions removed, bytes freed) are checked to be identical.

Temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sqlite3
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _benchlib  # noqa: E402
import buffylite  # noqa: E402
from buffylite import ReCachingStrategy, RequestCacheConfiguration  # noqa: E402


def checkpoint(path: pathlib.Path) -> None:
    """Fold the WAL into the main file so the file alone is the whole database."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        connection.close()


def copy_database(source: pathlib.Path, target: pathlib.Path) -> None:
    """Copy a closed, checkpointed cache file (and drop any stale WAL/SHM of the target)."""
    for suffix in ("-wal", "-shm"):
        pathlib.Path(str(target) + suffix).unlink(missing_ok=True)
    shutil.copyfile(source, target)


def add_fillers(cache: buffylite.Cache, base: str, prefix: str, count: int, versions: int,
                body_bytes: int) -> None:
    """``count`` more requests with ``versions`` ready versions each (public API)."""
    keep = RequestCacheConfiguration(recaching_strategy=ReCachingStrategy.when_requested(),
                                     max_cached_unpinned_versions=versions)
    for index in range(count):
        url = f"{base}/changing/{body_bytes}?key={prefix}-{index}"
        for _ in range(versions):
            cache.fetch(url, cache_configuration=keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 versions, 10 vs 2,000 requests, 3 rounds")
    parser.add_argument("--versions", type=int, help="versions of the measured request (default 1000)")
    parser.add_argument("--requests", type=int, help="requests in the big cache (default 10000)")
    parser.add_argument("--filler-versions", type=int, default=3, help="versions per filler request (3)")
    parser.add_argument("--body-bytes", type=int, default=2048, help="size of every version's body (2048)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7; quick 3)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of one gc() in the big cache")
    args = parser.parse_args()
    quick = args.quick
    versions = args.versions or (300 if quick else 1000)
    big_n = args.requests or (2000 if quick else 10_000)
    rounds = args.rounds or (3 if quick else 7)
    small_n = 10

    print(f"gc_scale — {_benchlib.machine_description()}")
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    if quick:
        print(f"(--quick: {versions} versions and {big_n:,} requests instead of 1,000 and 10,000)")
    origin_process, base = _benchlib.start_origin()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="buffylite-gc-scale-"))
    try:
        url = f"{base}/changing/{args.body_bytes}?key=measured"
        small_template = workdir / "small-template.sqlite3"
        big_template = workdir / "big-template.sqlite3"

        # 1. The measured request with `versions` versions, plus fillers: the small cache.
        started = time.perf_counter()
        with buffylite.Cache(small_template) as cache:
            many = RequestCacheConfiguration(recaching_strategy=ReCachingStrategy.age(seconds=0),
                                             max_cached_unpinned_versions=versions)
            for _ in range(versions):
                response = cache.fetch(url, cache_configuration=many)
                assert response.outcome == "downloaded", response.outcome
            # 2. Lower the limit without creating a version row (so no GC runs yet).
            served = cache.fetch(url, cache_configuration=RequestCacheConfiguration(
                recaching_strategy=ReCachingStrategy.never(), max_cached_unpinned_versions=1))
            assert served.outcome == "cached", served.outcome
            held = len(cache.versions(url))
            stored = cache.get_request(url).cache_configuration.max_cached_unpinned_versions
            if held != versions or stored != 1:
                raise SystemExit(f"setup failed: {held} versions held (want {versions}), stored "
                                 f"max_cached_unpinned_versions={stored} (want 1)")
            add_fillers(cache, base, "small", small_n - 1, args.filler_versions, 100)
            small_stats = cache.stats()
        checkpoint(small_template)
        measured_build = time.perf_counter() - started

        # 3. The big cache: the same file plus many more requests.
        started = time.perf_counter()
        copy_database(small_template, big_template)
        with buffylite.Cache(big_template) as cache:
            add_fillers(cache, base, "big", big_n - small_n, args.filler_versions, 100)
            big_stats = cache.stats()
            assert len(cache.versions(url)) == versions
        checkpoint(big_template)
        fill_build = time.perf_counter() - started
        print(f"built through the public API: measured request + small cache {measured_build:.0f} s, "
              f"big cache fillers {fill_build:.0f} s")
        for label, stats, path in (("small", small_stats, small_template), ("big", big_stats, big_template)):
            print(f"  {label:5} cache: {stats['requests']:>6,} requests, {stats['versions']['ready']:>6,} "
                  f"ready versions, {stats['unique_contents']:>6,} contents, file "
                  f"{path.stat().st_size / 2**20:6.1f} MiB")

        # 4. Timed rounds (round 0 is a warm-up, not counted).
        caches = [(f"{small_n}", small_template), (f"{big_n:,}", big_template)]
        times = {label: [] for label, _ in caches}
        reports = {label: [] for label, _ in caches}
        for round_index in range(rounds + 1):
            order = caches if round_index % 2 == 0 else caches[::-1]
            for label, template in order:
                work = workdir / "work.sqlite3"
                copy_database(template, work)
                with buffylite.Cache(work) as cache:
                    cache.get(url)  # open the connection; read the request
                    started = time.perf_counter()
                    report = cache.gc(url)
                    elapsed = time.perf_counter() - started
                    left = len(cache.versions(url))
                if report.removed.get("unpinned") != versions - 1 or left != 1:
                    raise SystemExit(f"gc did not do the expected work: {report.removed}, {left} left")
                if round_index > 0:
                    times[label].append(elapsed)
                    reports[label].append((dict(report.removed), report.bytes_freed))
                for suffix in ("", "-wal", "-shm"):
                    pathlib.Path(str(work) + suffix).unlink(missing_ok=True)
        small_label, big_label = caches[0][0], caches[1][0]
        if reports[small_label][0] != reports[big_label][0]:
            raise SystemExit(f"the two gc runs did different work: {reports[small_label][0]} vs "
                             f"{reports[big_label][0]}")
        ratios = [big / small for big, small in zip(times[big_label], times[small_label])]
        removed, freed = reports[small_label][0]
        print(f"\ngc(url) of one request holding {versions:,} versions ({versions - 1:,} removable), "
              f"{rounds} rounds; each run removed {removed.get('unpinned')} versions and freed "
              f"{freed / 2**20:.2f} MiB of content")
        rows = [[f"{label} requests", f"{_benchlib.median(times[label]) * 1000:.1f}",
                 f"{min(times[label]) * 1000:.1f}", f"{max(times[label]) * 1000:.1f}",
                 " ".join(f"{value * 1000:.1f}" for value in times[label])] for label, _ in caches]
        _benchlib.print_table(["cache", "median ms", "min ms", "max ms", "per round ms"], rows)
        ratio = _benchlib.median(ratios)
        print(f"\nratio {big_label} / {small_label} requests: {ratio:.2f} (median of per-round ratios "
              f"{' '.join(f'{value:.2f}' for value in ratios)}); target < 1.5: "
              f"{'met' if ratio < 1.5 else 'MISSED'}")

        if args.profile:
            import cProfile
            import pstats
            work = workdir / "work.sqlite3"
            copy_database(big_template, work)
            with buffylite.Cache(work) as cache:
                cache.get(url)
                profiler = cProfile.Profile()
                profiler.enable()
                cache.gc(url)
                profiler.disable()
            print("\ncProfile of one gc(url) in the big cache (top 15 by cumulative time):")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(15)
    finally:
        _benchlib.stop_origin(origin_process)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
