"""Mixed-load stress test of one cache file shared by several processes:
N processes for S seconds doing a random mix of fetch / pin / unpin /
tag / untag / gc / verify / versions against a loopback origin whose content changes,
then a check of the file's invariants.

    .venv/bin/python bench/stress.py                 # 4 processes, 60 s
    .venv/bin/python bench/stress.py --quick         # 4 processes, 10 s
    .venv/bin/python bench/stress.py --processes 6 --threads 2 --seconds 120 --seed 7

The origin (bench/_benchlib.py, a subprocess on 127.0.0.1) serves:
small bodies that change on every request (``when_requested``: a new version each
fetch), bodies that change every 3rd request (``when_remote_changed`` with a short
check interval: 304s, duplicates), a 3 MB body spanning several chunks (``age``), a body
dripped over 0.3 s (``when_requested``: downloads overlap across processes, single
flight and waiting), and a flaky body answering 503 30% of the time (failed versions,
stale fallbacks). Every URL was fetched once before the workers start, so a failed
download always has a version to fall back on.

Each worker (a process, optionally with several threads sharing one ``Cache``) loops
until the deadline, picking an operation at random (seeded):

- ``fetch``: a random URL, random ``prefer_cached``, sometimes ``pin_for`` — then the
  content is read back and must hash to ``content_hash_hex`` (read under the lease, so
  no GC can remove it meanwhile, SPEC §9);
- ``pin`` / ``tag`` / ``untag``: on a version obtained with ``fetch(prefer_version=...,
  pin_for=...)`` (leased in the transaction that chose it, so it cannot vanish);
- ``unpin``: of a permanently pinned version; each URL's pins are made and removed by
  one owning worker only, and at most 4 are kept per URL (below
  ``max_cached_pinned_versions``), so a listed pin cannot vanish before the unpin;
- ``gc`` (all requests, or one), ``verify`` (must report nothing corrupted), ``versions``
  (``status=None``; its chain links must be consistent, §8).

Any exception is an error: counted per operation and printed. At the end (after the
leases ran out and one final ``gc()``): ``PRAGMA integrity_check`` and
``foreign_key_check``; every ready version's content hashes to its recorded hash;
``verify()`` finds nothing; the §8 chain of every request (walking ``next_version`` from
the oldest ready version visits each ready version once, in order, ``previous_version``
mirrors it, other states have no links); and the §10 GC bounds (no duplicate or
abandoned rows, at most one failed row per request, at most ``max_cached_*`` versions).
Exit status 1 when any error or invariant failure was seen. Temporary files are removed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import random
import sqlite3
import subprocess
import sys
import threading
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import buffylite  # noqa: E402
from buffylite import ReCachingStrategy, RequestCacheConfiguration  # noqa: E402

#: Seconds of every lease the workers take (fetch(pin_for=...)).
LEASE_SEC = 3.0
#: Permanent pins one owner keeps per URL at most (below max_cached_pinned_versions).
MAX_PINS_PER_URL = 4
#: Relative weights of the operations.
OPERATION_WEIGHTS = {"fetch": 40, "versions": 14, "pin": 8, "unpin": 8, "tag": 8, "untag": 4,
                     "gc": 6, "verify": 3}
TAGS = ["blue", "green", "release-1", "keep_me"]


def url_plan(base: str) -> list[tuple[str, RequestCacheConfiguration]]:
    """The URLs the workers share, each with the configuration every fetch passes."""
    def config(strategy, unpinned=2, pinned=10):
        return RequestCacheConfiguration(recaching_strategy=strategy, max_cached_unpinned_versions=unpinned,
                                         max_cached_pinned_versions=pinned)
    plan = []
    for index in range(3):
        plan.append((f"{base}/changing/2000?key=small{index}",
                     config(ReCachingStrategy.when_requested(), unpinned=2 + index)))
    for index in range(2):
        plan.append((f"{base}/changing/50000?key=some{index}&every=3",
                     config(ReCachingStrategy.when_remote_changed(check_interval_sec=0.2,
                                                                  fallback_max_age_sec=1))))
    plan.append((f"{base}/changing/3000000?key=big&every=2", config(ReCachingStrategy.age(seconds=1))))
    plan.append((f"{base}/slow/200000?seed=5&ms=300", config(ReCachingStrategy.when_requested())))
    plan.append((f"{base}/flaky/4000?key=flaky&fail=0.3", config(ReCachingStrategy.when_requested(), 3)))
    return plan


def open_cache(path: str) -> buffylite.Cache:
    # One retry with a short wait keeps the flaky URL from stalling a worker.
    return buffylite.Cache(path, timeout=20, retries=1, max_retry_wait=0.2)


# ---------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------


def check_chain_links(responses) -> None:
    """§8 on one versions() answer: ready versions linked to their neighbours, others unlinked."""
    ready = sorted((r for r in responses if r.status == "ready"), key=lambda r: r.version)
    for index, response in enumerate(ready):
        expected_previous = ready[index - 1].version if index > 0 else None
        expected_next = ready[index + 1].version if index + 1 < len(ready) else None
        if (response.previous_version, response.next_version) != (expected_previous, expected_next):
            raise AssertionError(f"chain broken at {response.version}: previous/next "
                                 f"{response.previous_version}/{response.next_version}, expected "
                                 f"{expected_previous}/{expected_next}")
    for response in responses:
        if response.status != "ready" and (response.previous_version or response.next_version):
            raise AssertionError(f"{response.status} version {response.version} is linked into the chain")


class Worker:
    """One thread of a worker process: random operations until the deadline."""

    def __init__(self, cache, plan, owned: set[int], seed: str, deadline: float):
        self.cache = cache
        self.plan = plan
        self.owned = sorted(owned)
        self.random = random.Random(seed)
        self.deadline = deadline
        self.done = collections.Counter()
        self.errors = collections.Counter()
        self.outcomes = collections.Counter()
        self.samples: list[str] = []

    def run(self) -> None:
        names, weights = zip(*OPERATION_WEIGHTS.items())
        while time.time() < self.deadline:
            name = self.random.choices(names, weights)[0]
            try:
                getattr(self, f"op_{name}")()
                self.done[name] += 1
            except Exception as exc:  # noqa: BLE001 - every exception is an error here
                self.errors[name] += 1
                if len(self.samples) < 20:
                    self.samples.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def _pick(self, owned: bool = False):
        index = self.random.choice(self.owned) if owned and self.owned else self.random.randrange(len(self.plan))
        return self.plan[index]

    def _leased(self, url, configuration, **choice):
        """A version of ``url`` leased in the transaction that chose it."""
        return self.cache.fetch(url, cache_configuration=configuration, pin_for=LEASE_SEC, **choice)

    @staticmethod
    def _check_content(response) -> None:
        digest = hashlib.sha256()
        if response.content_attributes.content_size_bytes and response.content_attributes.content_size_bytes > 1 << 20:
            with response.open() as stream:
                while piece := stream.read(1 << 20):
                    digest.update(piece)
        else:
            digest.update(response.read())
        if digest.hexdigest() != response.content_hash_hex:
            raise AssertionError(f"version {response.version} of {response.url} reads back with sha256 "
                                 f"{digest.hexdigest()}, recorded {response.content_hash_hex}")

    def op_fetch(self) -> None:
        url, configuration = self._pick()
        options = {"prefer_cached": self.random.random() < 0.7}
        leased = self.random.random() < 0.5
        if leased:
            options["pin_for"] = LEASE_SEC
        if self.random.random() < 0.1:
            options["prefer_tag"] = self.random.choice(TAGS)
        response = self.cache.fetch(url, cache_configuration=configuration, **options)
        self.outcomes[response.outcome] += 1
        if response.status != "ready":
            raise AssertionError(f"fetch returned a {response.status} version")
        if leased:
            self._check_content(response)

    def _random_version(self, url: str):
        listed = self.cache.versions(url)
        return self.random.choice(listed).version if listed else None

    def op_pin(self) -> None:
        url, configuration = self._pick(owned=True)
        if not self.owned:
            return
        if sum(1 for r in self.cache.versions(url) if r.pinned) >= MAX_PINS_PER_URL:
            return
        response = self._leased(url, configuration, prefer_version=self._random_version(url))
        pinned = self.cache.pin(response)
        if not pinned.pinned:
            raise AssertionError("pin() returned an unpinned version")

    def op_unpin(self) -> None:
        url, _ = self._pick(owned=True)
        if not self.owned:
            return
        pinned = [r for r in self.cache.versions(url) if r.pinned]
        if pinned:
            response = self.cache.unpin(self.random.choice(pinned))
            if response.pinned or response.is_pinned:
                raise AssertionError("unpin() left the version pinned")

    def op_tag(self) -> None:
        url, configuration = self._pick()
        response = self._leased(url, configuration, prefer_version=self._random_version(url))
        tag = self.random.choice(TAGS)
        if tag not in self.cache.tag(response, tag).tags:
            raise AssertionError("tag() did not add the tag")

    def op_untag(self) -> None:
        url, configuration = self._pick()
        tag = self.random.choice(TAGS)
        response = self._leased(url, configuration, prefer_tag=tag)
        if tag in response.tags and tag in self.cache.untag(response, tag).tags:
            raise AssertionError("untag() did not remove the tag")

    def op_gc(self) -> None:
        if self.random.random() < 0.5:
            self.cache.gc()
        else:
            self.cache.gc(self._pick()[0])

    def op_verify(self) -> None:
        report = self.cache.verify()
        if report.corrupted:
            raise AssertionError(f"verify() reported {len(report.corrupted)} corrupted version(s): "
                                 + ", ".join(f"{r.url} {r.version}" for r in report.corrupted[:3]))
        if report.problems:
            raise AssertionError(f"verify() reported {len(report.problems)} problem(s): {report.problems[:3]}")

    def op_versions(self) -> None:
        url, _ = self._pick()
        check_chain_links(self.cache.versions(url, status=None))


def worker_main(index: int, processes: int, threads: int, cache_path: str, base: str, seed: int,
                deadline: float) -> None:
    """Entry point of a worker process: print one JSON line with its counters."""
    plan = url_plan(base)
    owned_by_process = {url_index for url_index in range(len(plan)) if url_index % processes == index}
    cache = open_cache(cache_path)
    workers = []
    for thread_index in range(threads):
        # Ownership of pins per thread, so one owner per URL even with threads.
        owned = {url_index for url_index in owned_by_process
                 if (url_index // processes) % threads == thread_index}
        workers.append(Worker(cache, plan, owned, f"{seed}:{index}:{thread_index}", deadline))
    pool = [threading.Thread(target=worker.run) for worker in workers]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    cache.close()
    summary = {"done": collections.Counter(), "errors": collections.Counter(),
               "outcomes": collections.Counter(), "samples": []}
    for worker in workers:
        summary["done"].update(worker.done)
        summary["errors"].update(worker.errors)
        summary["outcomes"].update(worker.outcomes)
        summary["samples"].extend(worker.samples)
    print(json.dumps(summary), flush=True)


# ---------------------------------------------------------------------------
# Final checks
# ---------------------------------------------------------------------------


def final_checks(cache_path: str, plan) -> list[tuple[str, bool, str]]:
    """The invariants at the end; returns (check, ok, detail) rows."""
    results = []
    connection = sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True)
    try:
        integrity = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        results.append(("PRAGMA integrity_check", integrity == ["ok"], "; ".join(integrity[:3])))
        foreign = connection.execute("PRAGMA foreign_key_check").fetchall()
        results.append(("PRAGMA foreign_key_check", not foreign, f"{len(foreign)} violation(s)"))
    finally:
        connection.close()

    configurations = {url: configuration for url, configuration in plan}
    with open_cache(cache_path) as cache:
        # Every ready version's content hashes to its recorded hash.
        checked, wrong = 0, []
        for request in cache.requests():
            for response in cache.versions(request.url, group=request.group_name):
                digest = hashlib.new(request.validation_hash_type)
                with response.open() as stream:
                    while piece := stream.read(1 << 20):
                        digest.update(piece)
                checked += 1
                if digest.hexdigest() != response.content_hash_hex:
                    wrong.append(f"{request.url} {response.version}")
        results.append(("ready contents hash to their recorded hash", not wrong,
                        f"{checked} versions read back" + (f"; wrong: {wrong[:3]}" if wrong else "")))
        report = cache.verify()
        results.append(("verify() finds nothing corrupted and no problem", report.intact,
                        f"{report.checked} contents re-hashed, {len(report.corrupted)} corrupted, "
                        f"{len(report.problems)} problems"))

        # §8 chain of every request.
        broken = []
        for request in cache.requests():
            everything = cache.versions(request.url, status=None, group=request.group_name)
            ready = {r.version: r for r in everything if r.status == "ready"}
            try:
                check_chain_links(everything)
                if ready:
                    walked, current = [], min(ready)
                    previous = None
                    while current is not None:
                        if current in walked or current not in ready:
                            raise AssertionError(f"walk revisits or leaves the ready set at {current}")
                        if ready[current].previous_version != previous:
                            raise AssertionError(f"previous_version of {current} is "
                                                 f"{ready[current].previous_version}, walked from {previous}")
                        walked.append(current)
                        previous, current = current, ready[current].next_version
                    if walked != sorted(ready):
                        raise AssertionError(f"walk visited {len(walked)} of {len(ready)} ready versions")
            except AssertionError as exc:
                broken.append(f"{request.url}: {exc}")
        results.append(("§8 chain of every request", not broken,
                        f"{len(cache.requests())} requests" + (f"; {broken[:2]}" if broken else "")))

        # §10 GC bounds once every lease has run out.
        time.sleep(LEASE_SEC + 0.5)
        cache.gc()
        problems = []
        for request in cache.requests():
            everything = cache.versions(request.url, status=None, group=request.group_name)
            configuration = configurations.get(request.url, request.cache_configuration)
            states = collections.Counter(r.status for r in everything)
            ready = [r for r in everything if r.status == "ready"]
            unpinned = [r for r in ready if not r.is_pinned]
            pinned = [r for r in ready if r.pinned]
            if states["duplicate"] or states["wait"] or states["in_progress"]:
                problems.append(f"{request.url}: {dict(states)}")
            if states["failed"] > 1:
                problems.append(f"{request.url}: {states['failed']} failed rows")
            if len(unpinned) > max(configuration.max_cached_unpinned_versions, 1):
                problems.append(f"{request.url}: {len(unpinned)} unpinned ready versions")
            if len([r for r in pinned if r.version != ready[0].version]) > configuration.max_cached_pinned_versions:
                problems.append(f"{request.url}: {len(pinned)} pinned versions")
        results.append(("§10 GC bounds after a final gc()", not problems,
                        "; ".join(problems[:3]) or "no duplicate/abandoned rows, limits kept"))
        stats = cache.stats()
    results.append(("cache file", True, f"{stats['requests']} requests, versions {stats['versions']}, "
                    f"{stats['unique_contents']} contents, {stats['file_size_bytes'] / 2**20:.1f} MiB"))
    return results


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4, help="worker processes (4)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker process sharing one Cache (1)")
    parser.add_argument("--seconds", type=float, help="duration (60; --quick 10)")
    parser.add_argument("--quick", action="store_true", help="10 seconds")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the workers (0)")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        index, processes, threads, cache_path, base, seed, deadline = args.worker
        worker_main(int(index), int(processes), int(threads), cache_path, base, int(seed), float(deadline))
        return 0
    seconds = args.seconds or (10.0 if args.quick else 60.0)

    import shutil
    import tempfile

    import _benchlib
    print(f"stress — {_benchlib.machine_description()}")
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"{args.processes} processes × {args.threads} thread(s), {seconds:g} s, seed {args.seed}")
    origin_process, base = _benchlib.start_origin()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="buffylite-stress-"))
    workers: list[subprocess.Popen] = []
    failed = False
    try:
        cache_path = str(workdir / "cache.sqlite3")
        plan = url_plan(base)
        with open_cache(cache_path) as cache:
            for url, configuration in plan:
                for _attempt in range(50):  # the flaky URL may need a few tries
                    try:
                        cache.fetch(url, cache_configuration=configuration)
                        break
                    except buffylite.FetchError:
                        continue
                else:
                    raise SystemExit(f"setup: {url} never answered")
        deadline = time.time() + seconds + 1.0  # 1 s for the workers to start
        for index in range(args.processes):
            workers.append(subprocess.Popen(
                [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(index),
                 str(args.processes), str(args.threads), cache_path, base, str(args.seed),
                 repr(deadline)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        done, errors, outcomes = collections.Counter(), collections.Counter(), collections.Counter()
        per_worker = []
        samples = []
        for index, process in enumerate(workers):
            try:
                output, stderr = process.communicate(timeout=seconds + 180)
            except subprocess.TimeoutExpired:
                process.kill()
                output, stderr = process.communicate()
                stderr += "\n(killed: did not finish in time)"
            lines = output.strip().splitlines()
            if process.returncode != 0 or not lines:
                failed = True
                per_worker.append([f"worker {index}", "crashed", stderr.strip()[-500:]])
                continue
            summary = json.loads(lines[-1])
            done.update(summary["done"])
            errors.update(summary["errors"])
            outcomes.update(summary["outcomes"])
            samples.extend(summary["samples"])
            per_worker.append([f"worker {index}", f"{sum(summary['done'].values()):,}",
                               f"{sum(summary['errors'].values())}"])

        print(f"\noperations in {seconds:g} s ({sum(done.values()) / seconds:,.0f} per second in all):")
        rows = [[name, f"{done[name]:,}", str(errors[name])] for name in OPERATION_WEIGHTS]
        rows.append(["total", f"{sum(done.values()):,}", str(sum(errors.values()))])
        _benchlib.print_table(["operation", "done", "errors"], rows)
        print()
        _benchlib.print_table(["worker", "operations", "errors"], per_worker)
        print("\nfetch outcomes: " + ", ".join(f"{name} {count:,}" for name, count in sorted(outcomes.items())))
        counts = _benchlib.origin_counts(base)
        print(f"origin: {sum(counts.values()):,} GETs served")
        if samples:
            failed = True
            print(f"\nerrors ({sum(errors.values())}; first {min(len(samples), 5)} shown):")
            for sample in samples[:5]:
                print("  " + sample.replace("\n", "\n  "))

        print("\ninvariants at the end:")
        checks = final_checks(cache_path, plan)
        _benchlib.print_table(["check", "result", "detail"],
                              [[name, "ok" if ok else "FAIL", detail] for name, ok, detail in checks], align="lll")
        failed = failed or not all(ok for _, ok, _ in checks)
        print(f"\n{'FAILED' if failed else 'PASSED'}: {sum(done.values()):,} operations, "
              f"{sum(errors.values())} errors")
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
        _benchlib.stop_origin(origin_process)
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
