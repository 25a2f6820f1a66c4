"""buffylite against the caches a user would otherwise pick, in one run.

    .venv/bin/python bench/peers.py            # full run (about 6 minutes on 2 cores)
    .venv/bin/python bench/peers.py --quick    # about a minute, smaller sizes (see below)

What it measures, alternating the contenders round by round (the order rotates every
round) and computing each ratio *inside* a round, then taking the median over rounds
(machines are shared and noisy: absolute times drift, ratios hold):

- **hit**: a warm ``cache.fetch(url).read()`` of a 10 KB body under
  ``ReCachingStrategy.age(seconds=3600)``, per-call median and p99 in microseconds; vs
  requests-cache ``CachedSession(backend="sqlite").get(url).content``, pooch ``retrieve``
  of an existing file with its known sha256, diskcache ``Cache.get``, and the floor: a
  raw ``sqlite3`` primary-key SELECT of a 10 KB blob (WAL file, same disk).
- **cold**: the first download of a large body (256 MiB; 32 MiB with --quick) into an
  empty cache; wall time and peak RSS. Each contender runs in a fresh subprocess per
  round that prints its time and VmHWM (``/proc/self/status``) after its imports and
  after the download; memory is reported as the growth above the after-imports mark.
  The floor is urllib3 streaming to a file while computing sha256; also requests-cache
  and pooch. The origin is a separate process (``bench/origin.py`` routes).
- **read-back**: that body read back through ``Response.open()`` in 1 MiB reads, vs a
  plain file (the urllib3 floor's output) read in 1 MiB reads; both files were just
  written, so both are in the OS page cache. requests-cache's cached ``.get().content``
  is shown for information.
- **scale**: the hit above with 10 vs 10,000 requests stored (3 versions each; --quick
  stores only 1,000 so that the build fits in a minute, see ``--scale-requests``), and
  ``gc()`` of one request holding 3 versions of which 2 are removable, in both caches
  (a new such request per round; the WAL is checkpointed before each timed gc; the
  timed call includes what gc does at the end: incremental vacuum and checkpoint).
  The floor is the raw SELECT in a table of 30 vs 30,000 rows. The caches are built
  through the public API against the loopback origin (``when_requested`` with content
  that changes per request, 3 fetches per URL).
- **coldsmall**: what a pipeline touching many URLs pays. In one fresh process per
  contender and round, N = 400 distinct uncached 10 KB URLs are fetched one after the
  other (each through the contender's own storage); per-fetch median and p90 in ms, and
  the ratio to "urllib3 → file + sha256" (each body written to its own file) in the same
  round. The floor is a plain urllib3 GET that keeps nothing. Peers: diskcache (GET +
  ``set``), raw sqlite3 (GET + INSERT, one commit each, default rollback journal: an
  fsync per commit), pooch ``retrieve``, requests-cache ``get``.
- **hitfirst**: what a fresh process pays to find things. Each contender's store holds
  1,000 cached 10 KB URLs (built through its own API before timing); then one fresh
  process per contender and round requests each URL once, in a shuffled order; median
  and p99 per call in µs, the first call on its own, and the ratio to a raw sqlite3
  primary-key SELECT of a 10 KB blob made the same way (fresh process, 1,000 rows).
- **single flight**: upstream GETs counted at the origin when 8 threads + 3
  processes fetch one uncached URL at the same moment (the origin drips the body over
  ~1.5 s so every caller arrives while the first download is in flight).

**PostgreSQL column.** buffylite on PostgreSQL (``buffylite-pg``: ``Cache("postgresql://
...?schema=NAME")``) runs as one more contender in hit, cold (and read-back), coldsmall
and hitfirst, compared with the same floors. Next to it, the same work done with raw
psycopg on the same server, as the PostgreSQL floors: ``raw pg`` (hit: a primary-key
SELECT of a 10 KB ``bytea``, binary results; coldsmall: GET + INSERT, one commit each;
hitfirst: a SELECT in a fresh process) and ``pg chunks`` (cold: the stream stored as
1 MiB ``bytea`` rows, one commit each, plus sha256; read-back: buffylite-pg's own chunk
rows read by raw psycopg). Every cold and coldsmall round of a PostgreSQL contender uses
a schema of its own (dropped after the round), so no round sees another's data. The
server is a throwaway PostgreSQL 15 in a temporary directory with default settings
(``fsync`` on, like the SQLite contenders' durable commits), started and stopped by this
script, or the server named by ``--postgres-url`` / ``$BUFFYLITE_BENCH_POSTGRES_URL``
(its schemas are dropped at the end). ``--no-postgres`` leaves the column out; when no
server can be started, or buffylite refuses it, the column says why and the rest runs.

Bodies are ``/noise`` bodies of the origin (incompressible, like the archives and
images most downloads are): PostgreSQL compresses large values by default and SQLite
does not, so a repeating body would flatter the PostgreSQL store.

Then a summary table: measure, buffylite, buffylite-pg, each peer (with its ratio to the
floor), buffylite's ratio, and its target. Temporary files live in one temporary
directory that is removed at the end; the origin subprocess is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

HIT_BODY_BYTES = 10 * 1024
READ_BYTES = 1 << 20
#: The origin route of every body (hit, cold, coldsmall, hitfirst): incompressible bytes.
BODY_ROUTE = "noise"
COLD_CONTENDERS = ["urllib3", "buffylite", "sqlite3 chunks", "requests-cache", "pooch"]
HIT_CONTENDERS = ["raw sqlite3", "buffylite", "diskcache", "pooch", "requests-cache"]
FLIGHT_CONTENDERS = ["buffylite", "requests-cache", "pooch"]
COLDSMALL_CONTENDERS = ["plain GET", "urllib3 → file", "buffylite", "diskcache", "raw sqlite3", "pooch",
                        "requests-cache"]
HITFIRST_CONTENDERS = ["raw sqlite3", "buffylite", "diskcache", "pooch", "requests-cache"]
#: buffylite on PostgreSQL, and raw psycopg doing the same work on the same server.
PG_BUFFYLITE = "buffylite-pg"
PG_RAW = {"hit": "raw pg", "cold": "pg chunks", "coldsmall": "raw pg", "hitfirst": "raw pg"}


def _vm_hwm_kib() -> int:
    """VmHWM of this process in KiB (inline: a child must not import more than it needs)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def _raw_pg_connection():
    """A psycopg connection (autocommit) to ``$BENCH_PG_DSN`` using the schema
    ``$BENCH_PG_SCHEMA``, created if missing (the raw PostgreSQL floors)."""
    import psycopg
    connection = psycopg.connect(os.environ["BENCH_PG_DSN"], autocommit=True)
    schema = os.environ["BENCH_PG_SCHEMA"]
    connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    connection.execute(f'SET search_path TO "{schema}"')
    return connection


# ---------------------------------------------------------------------------
# Children (fresh subprocesses): cold download, single-flight caller
# ---------------------------------------------------------------------------


def child_cold(contender: str, url: str, directory: str) -> None:
    """Download ``url`` once into an empty store; print JSON with time and VmHWM.

    buffylite-pg's cache is ``$BENCH_CACHE`` (a PostgreSQL URL with its own schema)."""
    import hashlib
    if contender == "buffylite":
        import buffylite
    elif contender == PG_BUFFYLITE:
        # The driver is imported before the mark too, as buffylite imports it on first use:
        # the growth measured is the download's, not the import's.
        import psycopg  # noqa: F401

        import buffylite
    elif contender == PG_RAW["cold"]:
        import psycopg  # noqa: F401
        import urllib3
    elif contender == "urllib3":
        import urllib3
    elif contender == "sqlite3 chunks":
        import sqlite3

        import urllib3
    elif contender == "requests-cache":
        import requests_cache
    elif contender == "pooch":
        import logging
        import pooch
        pooch.get_logger().setLevel(logging.WARNING)
    hwm_imports = _vm_hwm_kib()
    started = time.perf_counter()
    if contender in ("buffylite", PG_BUFFYLITE):
        location = os.environ["BENCH_CACHE"] if contender == PG_BUFFYLITE else os.path.join(
            directory, "cache.sqlite3")
        with buffylite.Cache(location) as cache:
            digest = cache.fetch(url).content_hash_hex
        seconds = time.perf_counter() - started
    elif contender == PG_RAW["cold"]:
        # What buffylite's PostgreSQL storage costs at the least: the stream stored as
        # 1 MiB bytea rows (sent in binary), one commit each, plus sha256; the connection
        # and the table are made inside the timing, as buffylite opens its cache there.
        connection = _raw_pg_connection()
        connection.execute("CREATE TABLE chunk (content_id integer NOT NULL, seq integer NOT NULL, "
                           "data bytea NOT NULL, UNIQUE (content_id, seq))")
        pool = urllib3.PoolManager()
        response = pool.request("GET", url, preload_content=False)
        hasher = hashlib.sha256()
        with connection.cursor() as cursor:
            for seq, piece in enumerate(response.stream(READ_BYTES)):
                hasher.update(piece)
                cursor.execute("INSERT INTO chunk (content_id, seq, data) VALUES (1, %s, %b)", (seq, piece))
        response.release_conn()
        connection.close()
        digest = hasher.hexdigest()
        seconds = time.perf_counter() - started
    elif contender == "urllib3":
        pool = urllib3.PoolManager()
        response = pool.request("GET", url, preload_content=False)
        hasher = hashlib.sha256()
        with open(os.path.join(directory, "body.bin"), "wb") as output:
            for piece in response.stream(READ_BYTES):
                hasher.update(piece)
                output.write(piece)
        response.release_conn()
        digest = hasher.hexdigest()
        seconds = time.perf_counter() - started
    elif contender == "sqlite3 chunks":
        # What buffylite's storage costs at the least: the same stream stored as 1 MiB
        # rows of a WAL-mode SQLite file, one short transaction per row, plus sha256,
        # and a final checkpoint that moves the log into the file (timed too: until then
        # the data sits twice on disk, once in the write-ahead log).
        connection = sqlite3.connect(os.path.join(directory, "chunks.sqlite3"), isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("CREATE TABLE chunk (seq INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        pool = urllib3.PoolManager()
        response = pool.request("GET", url, preload_content=False)
        hasher = hashlib.sha256()
        for seq, piece in enumerate(response.stream(READ_BYTES)):
            hasher.update(piece)
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO chunk (seq, data) VALUES (?, ?)", (seq, piece))
            connection.execute("COMMIT")
        response.release_conn()
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        connection.close()
        digest = hasher.hexdigest()
        seconds = time.perf_counter() - started
    elif contender == "requests-cache":
        session = requests_cache.CachedSession(os.path.join(directory, "rc"), backend="sqlite")
        body = session.get(url).content
        seconds = time.perf_counter() - started
        digest = hashlib.sha256(body).hexdigest()
        del body
        session.close()
    else:
        path = pooch.retrieve(url, known_hash=None, fname="body.bin", path=directory, progressbar=False)
        seconds = time.perf_counter() - started
        hasher = hashlib.sha256()
        with open(path, "rb") as stored:
            while piece := stored.read(READ_BYTES):
                hasher.update(piece)
        digest = hasher.hexdigest()
    print(json.dumps({"seconds": seconds, "hwm_imports_kib": hwm_imports,
                      "hwm_peak_kib": _vm_hwm_kib(), "sha256": digest}), flush=True)


def _flight_caller(contender: str, url: str, directory: str, shared):
    """A function fetching ``url`` once with ``contender``; returns the body's sha256."""
    import hashlib
    if contender == "buffylite":
        import buffylite
        cache = shared or buffylite.Cache(os.path.join(directory, "cache.sqlite3"))
        return lambda: cache.fetch(url).content_hash_hex
    if contender == "requests-cache":
        import requests_cache

        def call():
            with requests_cache.CachedSession(os.path.join(directory, "rc"), backend="sqlite") as session:
                return hashlib.sha256(session.get(url).content).hexdigest()
        return call
    import logging
    import pooch
    pooch.get_logger().setLevel(logging.WARNING)

    def call():
        path = pooch.retrieve(url, known_hash=None, fname="body.bin", path=directory, progressbar=False)
        with open(path, "rb") as stored:
            return hashlib.sha256(stored.read()).hexdigest()
    return call


def child_flight(contender: str, url: str, directory: str) -> None:
    """Prepare, say "ready", wait for "go" on stdin, fetch once, print JSON."""
    call = _flight_caller(contender, url, directory, None)
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        print(json.dumps({"sha256": call()}), flush=True)
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)


# ---------------------------------------------------------------------------
# Children for the many-URL scenarios (coldsmall, hitfirst)
# ---------------------------------------------------------------------------


def _many_urls(base: str, count: int, first_seed: int) -> list[str]:
    """``count`` distinct 10 KB URLs of the origin, seeds ``first_seed`` onwards."""
    return [f"{base}/{BODY_ROUTE}/{HIT_BODY_BYTES}?seed={seed}" for seed in range(first_seed, first_seed + count)]


def _many_operation(contender: str, directory: str, urls: list[str], *, storing: bool):
    """``(url) -> bytes-or-path`` for ``contender`` over a store in ``directory``.

    ``storing`` True: the call downloads and stores (coldsmall, and building a
    hitfirst store); False: the call reads what is stored (hitfirst), never the network.
    Imports happen here, before any timing. buffylite-pg's cache is ``$BENCH_CACHE``;
    raw pg uses ``$BENCH_PG_DSN`` and ``$BENCH_PG_SCHEMA``.
    """
    import hashlib
    if contender in ("buffylite", PG_BUFFYLITE):
        import buffylite
        if contender == PG_BUFFYLITE:
            import psycopg  # noqa: F401  (imported before timing, like every contender's driver)
        cache = buffylite.Cache(os.environ["BENCH_CACHE"] if contender == PG_BUFFYLITE
                                else os.path.join(directory, "cache.sqlite3"))
        if storing:
            configuration = buffylite.RequestCacheConfiguration(
                recaching_strategy=buffylite.ReCachingStrategy.age(seconds=3600))
            return lambda url: cache.fetch(url, cache_configuration=configuration).read()
        return lambda url: cache.fetch(url).read()
    if contender in ("plain GET", "urllib3 → file", "diskcache", "raw sqlite3", PG_RAW["coldsmall"]) and storing:
        import urllib3
        pool = urllib3.PoolManager()
    if contender == "plain GET":
        return lambda url: pool.request("GET", url).data
    if contender == "urllib3 → file":
        counter = iter(range(10**9))

        def to_file(url):
            body = pool.request("GET", url).data
            hashlib.sha256(body).hexdigest()
            with open(os.path.join(directory, f"{next(counter)}.bin"), "wb") as output:
                output.write(body)
            return body
        return to_file
    if contender == "diskcache":
        import diskcache
        disk = diskcache.Cache(os.path.join(directory, "diskcache"))
        if storing:
            def get_and_set(url):
                body = pool.request("GET", url).data
                disk.set(url, body)
                return body
            return get_and_set
        return disk.get
    if contender == "raw sqlite3":
        import sqlite3
        connection = sqlite3.connect(os.path.join(directory, "raw.sqlite3"), isolation_level=None)
        connection.execute("CREATE TABLE IF NOT EXISTS blob (url TEXT PRIMARY KEY, data BLOB NOT NULL)")
        if storing:
            def get_and_insert(url):
                body = pool.request("GET", url).data
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("INSERT OR REPLACE INTO blob (url, data) VALUES (?, ?)", (url, body))
                connection.execute("COMMIT")
                return body
            return get_and_insert
        return lambda url: connection.execute("SELECT data FROM blob WHERE url = ?", (url,)).fetchone()[0]
    if contender == PG_RAW["coldsmall"]:
        connection = _raw_pg_connection()
        connection.execute("CREATE TABLE IF NOT EXISTS blob (url text PRIMARY KEY, data bytea NOT NULL)")
        if storing:
            def get_and_insert_pg(url):
                body = pool.request("GET", url).data
                connection.execute("INSERT INTO blob (url, data) VALUES (%s, %b) ON CONFLICT (url) "
                                   "DO UPDATE SET data = excluded.data", (url, body))
                return body
            return get_and_insert_pg
        cursor = connection.cursor(binary=True)
        return lambda url: cursor.execute("SELECT data FROM blob WHERE url = %s", (url,)).fetchone()[0]
    if contender == "pooch":
        import logging

        import pooch
        pooch.get_logger().setLevel(logging.WARNING)

        def name_of(url):
            return hashlib.sha1(url.encode()).hexdigest() + ".bin"
        if storing:
            return lambda url: pooch.retrieve(url, known_hash=None, fname=name_of(url), path=directory,
                                              progressbar=False)
        import origin
        # The hashes a pooch user keeps in a registry: known before the first call.
        known = {url: "sha256:" + origin.body_sha256(HIT_BODY_BYTES, int(url.rsplit("=", 1)[1]),
                                                     noise=BODY_ROUTE == "noise")
                 for url in urls}
        return lambda url: pooch.retrieve(url, known_hash=known[url], fname=name_of(url), path=directory,
                                          progressbar=False)
    if contender == "requests-cache":
        import requests_cache
        session = requests_cache.CachedSession(os.path.join(directory, "rc"), backend="sqlite",
                                               expire_after=3600)
        return lambda url: session.get(url).content
    raise ValueError(contender)


def child_many(kind: str, contender: str, base: str, directory: str) -> None:
    """coldsmall / hitfirst / build in a fresh process; prints JSON with per-call µs.

    The count and the first seed come from ``BENCH_COUNT`` and ``BENCH_SEED``.
    """
    import random
    count, first_seed = int(os.environ["BENCH_COUNT"]), int(os.environ["BENCH_SEED"])
    urls = _many_urls(base, count, first_seed)
    started = time.perf_counter()
    operation = _many_operation(contender, directory, urls, storing=kind != "hitfirst")
    setup_sec = time.perf_counter() - started
    if kind == "hitfirst":
        random.Random(first_seed).shuffle(urls)
    samples = []
    clock = time.perf_counter_ns
    for url in urls:
        begun = clock()
        result = operation(url)
        samples.append((clock() - begun) / 1000)
        if result is None:
            raise RuntimeError(f"{contender} returned nothing for {url}")
    print(json.dumps({"samples_us": samples, "setup_ms": setup_sec * 1000}), flush=True)


# ---------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------


def time_calls(operation, calls: int, cap_sec: float, warmup: int = 20) -> list[float]:
    """Per-call times in µs of ``operation()``: ``warmup`` untimed calls, then up to
    ``calls`` timed ones, stopping early after ``cap_sec`` (at least 100 samples)."""
    for _ in range(warmup):
        operation()
    samples = []
    deadline = time.perf_counter() + cap_sec
    clock = time.perf_counter_ns
    for index in range(calls):
        started = clock()
        operation()
        samples.append((clock() - started) / 1000)
        if index % 32 == 31 and index >= 100 and time.perf_counter() > deadline:
            break
    return samples


def fmt_us(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


class Bench:
    """One benchmark run: the origin, the temporary directory, the settings, the results."""

    def __init__(self, args, base_url: str, workdir: pathlib.Path, postgres=None,
                 postgres_note: str | None = None, buffylite_pg_note: str | None = None):
        """``postgres``: the ``_benchlib.PostgresServer`` of the PostgreSQL column, or None
        (``postgres_note`` then says why); ``buffylite_pg_note``: why buffylite-pg cannot run
        on that server (None: it can; the raw pg floors run either way)."""
        import _benchlib
        self.lib = _benchlib
        self.args = args
        self.base = base_url
        self.workdir = workdir
        self.summary: list[list[str]] = []
        self.postgres = postgres
        self.postgres_note = postgres_note
        self.buffylite_pg_note = buffylite_pg_note

    def pg_contenders(self, section: str) -> list[str]:
        """The PostgreSQL contenders of ``section`` that can run: buffylite-pg and its floor."""
        if self.postgres is None:
            return []
        return ([PG_BUFFYLITE] if self.buffylite_pg_note is None else []) + [PG_RAW[section]]

    def pg_env(self, contender: str, schema: str) -> dict:
        """Environment for a child running a PostgreSQL contender in its own ``schema``."""
        if contender == PG_BUFFYLITE:
            return {"BENCH_CACHE": self.postgres.url(schema)}
        self.postgres.schemas.append(schema)  # dropped at the end on a given server
        return {"BENCH_PG_DSN": self.lib._libpq_url(self.postgres.base_url), "BENCH_PG_SCHEMA": schema}

    def pg_missing_note(self) -> None:
        """Say under a section's table why PostgreSQL contenders are missing from it, if they are."""
        if self.postgres is None:
            print(f"({PG_BUFFYLITE}: not measured: {self.postgres_note})")
        elif self.buffylite_pg_note is not None:
            print(f"({PG_BUFFYLITE}: not measured: {self.buffylite_pg_note})")

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    # --- hit -------------------------------------------------------------------------

    def _hit_contenders(self, url: str, body: bytes) -> dict:
        """Set up every hit contender with the 10 KB body stored; returns name -> operation."""
        import hashlib
        import logging
        import sqlite3

        import buffylite
        import diskcache
        import pooch
        import requests_cache

        directory = self.workdir / "hit"
        directory.mkdir()
        operations = {}

        connection = sqlite3.connect(directory / "raw.sqlite3", isolation_level=None,
                                     check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        connection.execute("INSERT INTO blob (id, data) VALUES (1, ?)", (body,))
        operations["raw sqlite3"] = lambda: connection.execute(
            "SELECT data FROM blob WHERE id = ?", (1,)).fetchone()[0]

        cache = buffylite.Cache(directory / "buffylite.sqlite3")
        configuration = buffylite.RequestCacheConfiguration(
            recaching_strategy=buffylite.ReCachingStrategy.age(seconds=3600))
        cache.fetch(url, cache_configuration=configuration)
        operations["buffylite"] = lambda: cache.fetch(url).read()

        disk = diskcache.Cache(str(directory / "diskcache"))
        disk.set(url, body)
        operations["diskcache"] = lambda: disk.get(url)

        pooch.get_logger().setLevel(logging.WARNING)
        known = "sha256:" + hashlib.sha256(body).hexdigest()
        pooch_dir = str(directory / "pooch")
        pooch.retrieve(url, known_hash=known, fname="hit.bin", path=pooch_dir, progressbar=False)

        def pooch_hit():
            return pooch.retrieve(url, known_hash=known, fname="hit.bin", path=pooch_dir,
                                  progressbar=False)
        operations["pooch"] = pooch_hit

        session = requests_cache.CachedSession(str(directory / "requests-cache"), backend="sqlite")
        session.get(url)
        operations["requests-cache"] = lambda: session.get(url).content

        self._closers = [connection.close, cache.close, disk.close, session.close]
        pg_names = self.pg_contenders("hit")
        if PG_BUFFYLITE in pg_names:
            pg_cache = buffylite.Cache(self.postgres.url("bench_hit"))
            pg_cache.fetch(url, cache_configuration=configuration)
            operations[PG_BUFFYLITE] = lambda: pg_cache.fetch(url).read()
            self._closers.append(pg_cache.close)
        if PG_RAW["hit"] in pg_names:
            # The PostgreSQL floor: one primary-key SELECT of the 10 KB bytea, binary
            # results (psycopg prepares the statement after a few executions).
            self.postgres.schemas.append("bench_hit_raw")
            pg_connection = self.postgres.connect(autocommit=True)
            pg_connection.execute('CREATE SCHEMA "bench_hit_raw"')
            pg_connection.execute('SET search_path TO "bench_hit_raw"')
            pg_connection.execute("CREATE TABLE blob (id integer PRIMARY KEY, data bytea NOT NULL)")
            pg_connection.execute("INSERT INTO blob (id, data) VALUES (1, %b)", (body,))
            pg_cursor = pg_connection.cursor(binary=True)
            operations[PG_RAW["hit"]] = lambda: pg_cursor.execute(
                "SELECT data FROM blob WHERE id = %s", (1,)).fetchone()[0]
            self._closers.append(pg_connection.close)

        # Every contender must really return the body (pooch returns the file's path).
        for name, operation in operations.items():
            result = operation()
            if name == "pooch":
                result = pathlib.Path(result).read_bytes()
            assert bytes(result) == body, f"{name} returned the wrong body"
        if session.get(url).from_cache is not True:
            raise RuntimeError("requests-cache did not serve from its cache")
        return operations

    def run_hit(self) -> None:
        args = self.args
        self.section(f"hit: warm read of a {HIT_BODY_BYTES // 1024} KB body, per call (µs); "
                     f"{args.rounds} rounds × up to {args.hit_calls} calls")
        path = f"/{BODY_ROUTE}/{HIT_BODY_BYTES}?seed=7"
        url = self.base + path
        body = b"".join(self.lib.origin.body_bytes(HIT_BODY_BYTES, 7, noise=BODY_ROUTE == "noise"))
        operations = self._hit_contenders(url, body)
        contenders = HIT_CONTENDERS + self.pg_contenders("hit")
        counts_before = self.lib.origin_counts(self.base).get(path, 0)
        per_round = {name: [] for name in contenders}
        for round_index in range(args.rounds):
            order = contenders[round_index % len(contenders):] + contenders[:round_index % len(contenders)]
            for name in order:
                samples = time_calls(operations[name], args.hit_calls, args.hit_cap_sec)
                per_round[name].append((self.lib.median(samples), self.lib.percentile(samples, 0.99)))
        upstream = self.lib.origin_counts(self.base).get(path, 0) - counts_before
        for closer in self._closers:
            closer()
        floor = per_round["raw sqlite3"]
        rows, self.hit = [], {}
        for name in contenders:
            medians = [entry[0] for entry in per_round[name]]
            p99s = [entry[1] for entry in per_round[name]]
            ratios = [entry[0] / base[0] for entry, base in zip(per_round[name], floor)]
            self.hit[name] = (self.lib.median(medians), self.lib.median(p99s), self.lib.median(ratios))
            rows.append([name, fmt_us(self.hit[name][0]), fmt_us(self.hit[name][1]),
                         fmt_ratio(self.hit[name][2]),
                         " ".join(f"{ratio:.1f}" for ratio in ratios)])
        self.lib.print_table(["contender", "median µs", "p99 µs", "ratio vs floor", "per-round ratios"], rows)
        print(f"(upstream GETs of the hit URL during the timed calls: {upstream})")
        if PG_BUFFYLITE in per_round:
            self.hit["pg_vs_raw"] = self.lib.median(
                [entry[0] / base[0] for entry, base in zip(per_round[PG_BUFFYLITE], per_round[PG_RAW["hit"]])])
            print(f"({PG_BUFFYLITE} / {PG_RAW['hit']} on the same server: {fmt_ratio(self.hit['pg_vs_raw'])})")
        self.pg_missing_note()

    # --- cold + read-back -------------------------------------------------------------

    def _run_child(self, *child_args: str, timeout: float = 600, env: dict | None = None) -> dict:
        completed = __import__("subprocess").run(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", *child_args],
            capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
        if completed.returncode != 0:
            raise RuntimeError(f"child {child_args[:2]} failed:\n{completed.stderr}")
        return json.loads(completed.stdout.strip().splitlines()[-1])

    def _read_back(self, cache_path: pathlib.Path, plain_path: pathlib.Path, rc_path, url: str,
                   shift: int, pg_cache: str | None = None) -> dict:
        """Time one read of the body through each route (1 MiB reads), in an order rotated
        by ``shift``; returns route -> seconds (None: route not available). ``pg_cache``:
        the buffylite-pg cache of this round, read through buffylite and by raw psycopg."""
        import buffylite
        import requests_cache

        def through_buffylite(location):
            with buffylite.Cache(location) as cache:
                response = cache.get(url)
                started = time.perf_counter()
                total = 0
                with response.open() as stream:
                    while piece := stream.read(READ_BYTES):
                        total += len(piece)
                seconds = time.perf_counter() - started
            assert total == self.cold_size, f"buffylite read back {total} bytes from {location}"
            return seconds

        def plain_file():
            started = time.perf_counter()
            total = 0
            with open(plain_path, "rb") as plain:
                while piece := plain.read(READ_BYTES):
                    total += len(piece)
            seconds = time.perf_counter() - started
            assert total == self.cold_size
            return seconds

        def through_requests_cache():
            with requests_cache.CachedSession(str(rc_path), backend="sqlite") as session:
                started = time.perf_counter()
                content = session.get(url).content
                seconds = time.perf_counter() - started
                assert len(content) == self.cold_size
            return seconds

        routes = [("buffylite", lambda: through_buffylite(cache_path)), ("plain file", plain_file),
                  ("sqlite3 chunks", lambda: self._read_raw_chunks(cache_path)),
                  ("requests-cache", through_requests_cache)]
        if pg_cache is not None:
            routes += [(PG_BUFFYLITE, lambda: through_buffylite(pg_cache)),
                       (PG_RAW["cold"], lambda: self._read_raw_pg_chunks(pg_cache))]
        shift %= len(routes)
        return {name: route() for name, route in routes[shift:] + routes[:shift]}

    def _read_raw_chunks(self, cache_path: pathlib.Path) -> float | None:
        """Reference: the same chunk rows of the buffylite file read with raw sqlite3 (one
        cursor in one read transaction). Relies on buffylite's current table layout
        (``version``, ``chunk``); None when that layout is not there."""
        import sqlite3
        connection = sqlite3.connect(cache_path, isolation_level=None)
        try:
            content_id = connection.execute(
                "SELECT content_id FROM version WHERE status = 'ready'").fetchone()[0]
            started = time.perf_counter()
            total = 0
            connection.execute("BEGIN")
            for (data,) in connection.execute(
                    "SELECT data FROM chunk WHERE content_id = ? ORDER BY seq", (content_id,)):
                total += len(data)
            connection.execute("COMMIT")
            seconds = time.perf_counter() - started
            return seconds if total == self.cold_size else None
        except sqlite3.Error:
            return None
        finally:
            connection.close()

    def _read_raw_pg_chunks(self, pg_cache: str) -> float | None:
        """Reference: buffylite-pg's chunk rows read by raw psycopg, one primary-key SELECT
        per chunk with binary results (bounded memory, as a stream reads), in one read
        transaction. Relies on the PostgreSQL store's layout (``version``, ``chunk`` in the
        cache's schema); None when that layout is not there."""
        import urllib.parse

        import psycopg
        schema = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(pg_cache).query)).get("schema")
        try:
            with psycopg.connect(self.lib._libpq_url(pg_cache)) as connection:
                connection.execute(f'SET search_path TO "{schema}"')
                content_id = connection.execute(
                    "SELECT content_id FROM version WHERE status = 'ready'").fetchone()[0]
                seqs = [row[0] for row in connection.execute(
                    "SELECT seq FROM chunk WHERE content_id = %s ORDER BY seq", (content_id,))]
                started = time.perf_counter()
                total = 0
                with connection.cursor(binary=True) as cursor:
                    for seq in seqs:
                        cursor.execute("SELECT data FROM chunk WHERE content_id = %s AND seq = %s",
                                       (content_id, seq))
                        total += len(cursor.fetchone()[0])
                seconds = time.perf_counter() - started
            return seconds if total == self.cold_size else None
        except (psycopg.Error, TypeError):
            return None

    def run_cold(self) -> None:
        import shutil
        args = self.args
        self.cold_size = args.cold_mib << 20
        url = f"{self.base}/{BODY_ROUTE}/{self.cold_size}"
        expected = self.lib.origin.body_sha256(self.cold_size, noise=BODY_ROUTE == "noise")
        self.section(f"cold: first download of {args.cold_mib} MiB into an empty store, a fresh "
                     f"subprocess per contender per round; {args.cold_rounds} rounds")
        contenders = COLD_CONTENDERS + self.pg_contenders("cold")
        per_round = {name: [] for name in contenders}
        read_names = ["buffylite", "plain file", "sqlite3 chunks", "requests-cache"]
        if PG_BUFFYLITE in contenders:
            read_names += [PG_BUFFYLITE, PG_RAW["cold"]]
        read_rounds = {name: [] for name in read_names}
        for round_index in range(args.cold_rounds):
            shift = round_index % len(contenders)
            order = contenders[shift:] + contenders[:shift]
            directories, schemas, pg_cache = {}, [], None
            for name in order:
                directory = self.workdir / f"cold-{round_index}-{name.replace(' ', '-')}"
                directory.mkdir()
                directories[name] = directory
                env = None
                if name in (PG_BUFFYLITE, PG_RAW["cold"]):
                    # A schema per contender and round: no round sees another's data.
                    schema = f"bench_cold_{round_index}_{'buffylite' if name == PG_BUFFYLITE else 'raw'}"
                    schemas.append(schema)
                    env = self.pg_env(name, schema)
                    if name == PG_BUFFYLITE:
                        pg_cache = env["BENCH_CACHE"]
                result = self._run_child("cold", name, url, str(directory), env=env)
                if result["sha256"] != expected:
                    raise RuntimeError(f"{name} stored the wrong content ({result['sha256']})")
                per_round[name].append(result)
                print(f"  round {round_index + 1} {name:15} {result['seconds']:7.2f} s   peak RSS "
                      f"{result['hwm_peak_kib'] / 1024:7.1f} MiB (after imports "
                      f"{result['hwm_imports_kib'] / 1024:5.1f})", flush=True)
            # Read-back, the routes rotating within the round.
            for repetition in range(args.read_reps):
                times = self._read_back(directories["buffylite"] / "cache.sqlite3",
                                        directories["urllib3"] / "body.bin",
                                        directories["requests-cache"] / "rc", url,
                                        round_index + repetition, pg_cache)
                for name, seconds in times.items():
                    read_rounds[name].append((round_index, float("nan") if seconds is None else seconds))
            for directory in directories.values():
                shutil.rmtree(directory, ignore_errors=True)
            for schema in schemas:
                self.postgres.drop_schema(schema)

        floor = per_round["urllib3"]
        rows, self.cold = [], {}
        for name in contenders:
            seconds = [entry["seconds"] for entry in per_round[name]]
            growth = [(entry["hwm_peak_kib"] - entry["hwm_imports_kib"]) / 1024 for entry in per_round[name]]
            imports = [entry["hwm_imports_kib"] / 1024 for entry in per_round[name]]
            peaks = [entry["hwm_peak_kib"] / 1024 for entry in per_round[name]]
            ratios = [entry["seconds"] / base["seconds"] for entry, base in zip(per_round[name], floor)]
            self.cold[name] = {"seconds": self.lib.median(seconds), "ratio": self.lib.median(ratios),
                               "growth_mib": max(growth), "imports_mib": self.lib.median(imports),
                               "peak_mib": max(peaks)}
            rows.append([name, f"{self.lib.median(seconds):.2f}",
                         f"{args.cold_mib / self.lib.median(seconds):.0f}", fmt_ratio(self.lib.median(ratios)),
                         f"{self.lib.median(imports):.1f}", f"{max(peaks):.1f}", f"+{max(growth):.1f}"])
        self.lib.print_table(["contender", "median s", "MiB/s", "ratio vs urllib3",
                              "RSS after imports MiB", "peak RSS MiB (max)", "growth MiB (max)"], rows)
        if PG_BUFFYLITE in per_round:
            self.cold["pg_vs_raw"] = self.lib.median(
                [entry["seconds"] / base["seconds"]
                 for entry, base in zip(per_round[PG_BUFFYLITE], per_round[PG_RAW["cold"]])])
            print(f"({PG_BUFFYLITE} / {PG_RAW['cold']} on the same server: {fmt_ratio(self.cold['pg_vs_raw'])})")
        self.pg_missing_note()

        self.section(f"read-back: {args.cold_mib} MiB in 1 MiB reads, {args.read_reps} per round")
        self.read = {}
        rows = []
        for name in read_names:
            seconds = [entry[1] for entry in read_rounds[name]]
            ratios = [entry[1] / base[1] for entry, base in zip(read_rounds[name], read_rounds["plain file"])]
            self.read[name] = (self.lib.median(seconds), self.lib.median(ratios))
            rows.append([name, f"{self.lib.median(seconds) * 1000:.0f}",
                         f"{args.cold_mib / self.lib.median(seconds):.0f}", fmt_ratio(self.lib.median(ratios))])
        self.lib.print_table(["route", "median ms", "MiB/s", "ratio vs plain file"], rows)
        print("(sqlite3 chunks: buffylite's chunk rows read by raw sqlite3, the storage floor; "
              "requests-cache: the cached session.get(url).content, whole body in memory"
              + (f"; {PG_RAW['cold']}: {PG_BUFFYLITE}'s chunk rows read by raw psycopg, a SELECT per chunk"
                 if PG_BUFFYLITE in read_names else "") + ")")

    # --- scale ---------------------------------------------------------------------

    def _build_cache(self, path: pathlib.Path, requests: int, versions: int, hit_url: str):
        """A buffylite cache holding ``requests`` requests × ``versions`` versions, built
        through the public API; the hit URL (10 KB) is the first request."""
        import buffylite
        strategy = buffylite.ReCachingStrategy
        keep = buffylite.RequestCacheConfiguration(recaching_strategy=strategy.when_requested(),
                                                   max_cached_unpinned_versions=versions)
        cache = buffylite.Cache(path)
        for _ in range(versions):
            cache.fetch(hit_url, cache_configuration=keep)
        # Same request, now under age(3600): served from the cache, no new version.
        served = cache.fetch(hit_url, cache_configuration=buffylite.RequestCacheConfiguration(
            recaching_strategy=strategy.age(seconds=3600), max_cached_unpinned_versions=versions))
        assert served.outcome == "cached", served.outcome
        for index in range(requests - 1):
            filler = f"{self.base}/changing/100?key={path.stem}-{index}"
            for _ in range(versions):
                cache.fetch(filler, cache_configuration=keep)
        stats = cache.stats()
        assert stats["requests"] == requests, stats
        assert stats["versions"]["ready"] == requests * versions, stats
        return cache

    def _raw_table(self, path: pathlib.Path, rows: int, body: bytes):
        import sqlite3
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        connection.execute("BEGIN")
        connection.execute("INSERT INTO blob (id, data) VALUES (1, ?)", (body,))
        filler = os.urandom(100)
        connection.executemany("INSERT INTO blob (data) VALUES (?)", ((filler,) for _ in range(rows - 1)))
        connection.execute("COMMIT")
        return connection

    @staticmethod
    def _checkpoint(path: pathlib.Path) -> None:
        """Fold the WAL into the main file (the same state before each timed gc)."""
        import sqlite3
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            connection.close()

    def run_scale(self) -> None:
        import buffylite
        args = self.args
        versions = 3
        big_n = args.scale_requests
        self.section(f"scale: hit latency and gc() of one request with 10 vs {big_n:,} requests "
                     f"stored ({versions} versions each); {args.rounds} rounds")
        if big_n < 10_000:
            print(f"(--quick or --scale-requests: {big_n:,} requests instead of 10,000)")
        hit_url = f"{self.base}/changing/{HIT_BODY_BYTES}?key=scale-hit"
        started = time.perf_counter()
        small_path, big_path = self.workdir / "scale-small.sqlite3", self.workdir / "scale-big.sqlite3"
        small = self._build_cache(small_path, 10, versions, hit_url)
        big = self._build_cache(big_path, big_n, versions, hit_url)
        build_sec = time.perf_counter() - started
        body = small.fetch(hit_url).read()
        raw_small = self._raw_table(self.workdir / "raw-small.sqlite3", 10 * versions, body)
        raw_big = self._raw_table(self.workdir / "raw-big.sqlite3", big_n * versions, body)
        print(f"(built in {build_sec:.0f} s through the public API; files: "
              f"{small.stats()['file_size_bytes'] / 2**20:.1f} MiB and "
              f"{big.stats()['file_size_bytes'] / 2**20:.1f} MiB)", flush=True)
        select = "SELECT data FROM blob WHERE id = ?"
        operations = {
            "buffylite 10": lambda: small.fetch(hit_url).read(),
            f"buffylite {big_n}": lambda: big.fetch(hit_url).read(),
            "raw sqlite3 10": lambda: raw_small.execute(select, (1,)).fetchone()[0],
            f"raw sqlite3 {big_n}": lambda: raw_big.execute(select, (1,)).fetchone()[0],
        }
        # Each cache fetched its own generation of the changing URL: compare with its own.
        big_body = big.fetch(hit_url).read()
        for name, operation in operations.items():
            assert len(operation()) == HIT_BODY_BYTES, name
        assert small.fetch(hit_url).outcome == big.fetch(hit_url).outcome == "cached"
        assert raw_small.execute(select, (1,)).fetchone()[0] == body and len(big_body) == len(body)
        names = list(operations)
        per_round = {name: [] for name in names}
        gc_rounds = {"10": [], str(big_n): []}
        one = buffylite.RequestCacheConfiguration(recaching_strategy=buffylite.ReCachingStrategy.never(),
                                                  max_cached_unpinned_versions=1)
        keep = buffylite.RequestCacheConfiguration(
            recaching_strategy=buffylite.ReCachingStrategy.when_requested(),
            max_cached_unpinned_versions=versions)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples = time_calls(operations[name], args.hit_calls, args.hit_cap_sec)
                per_round[name].append(self.lib.median(samples))
            # gc() of one request with 3 versions, 2 of them removable: a new request per
            # round in each cache; its configuration is lowered to 1 by a fetch that
            # downloads nothing (so no GC runs), the WAL is checkpointed, then gc(url) is timed.
            pairs = [("10", small, small_path), (str(big_n), big, big_path)]
            for label, cache, path in (pairs if round_index % 2 == 0 else pairs[::-1]):
                url = f"{self.base}/changing/1000?key=gc-{label}-{round_index}"
                for _ in range(versions):
                    cache.fetch(url, cache_configuration=keep)
                cache.fetch(url, cache_configuration=one)
                assert len(cache.versions(url)) == versions
                self._checkpoint(path)
                started = time.perf_counter()
                report = cache.gc(url)
                gc_rounds[label].append(time.perf_counter() - started)
                assert report.removed["unpinned"] == versions - 1, report
        rows = []
        ratio_rows = {}
        for prefix in ("buffylite", "raw sqlite3"):
            small_name, big_name = f"{prefix} 10", f"{prefix} {big_n}"
            ratios = [b / s for b, s in zip(per_round[big_name], per_round[small_name])]
            ratio_rows[prefix] = self.lib.median(ratios)
            rows.append([f"hit, {prefix}", fmt_us(self.lib.median(per_round[small_name])),
                         fmt_us(self.lib.median(per_round[big_name])), fmt_ratio(ratio_rows[prefix]),
                         " ".join(f"{ratio:.2f}" for ratio in ratios)])
        gc_ratios = [b / s for b, s in zip(gc_rounds[str(big_n)], gc_rounds["10"])]
        rows.append(["gc(url), buffylite", fmt_us(self.lib.median(gc_rounds["10"]) * 1e6),
                     fmt_us(self.lib.median(gc_rounds[str(big_n)]) * 1e6),
                     fmt_ratio(self.lib.median(gc_ratios)), " ".join(f"{ratio:.2f}" for ratio in gc_ratios)])
        self.lib.print_table(["measure (µs)", "10 requests", f"{big_n:,} requests", "ratio", "per-round ratios"],
                             rows)
        self.scale = {"hit_ratio": ratio_rows["buffylite"], "raw_ratio": ratio_rows["raw sqlite3"],
                      "gc_ratio": self.lib.median(gc_ratios), "big_n": big_n,
                      "hit_small": self.lib.median(per_round["buffylite 10"]),
                      "hit_big": self.lib.median(per_round[f"buffylite {big_n}"]),
                      "gc_small": self.lib.median(gc_rounds["10"]), "gc_big": self.lib.median(gc_rounds[str(big_n)])}
        for closer in (small.close, big.close, raw_small.close, raw_big.close):
            closer()

    # --- many URLs: coldsmall, hitfirst ----------------------------------------------

    def _run_many(self, kind: str, contender: str, directory: pathlib.Path, count: int, seed: int,
                  env: dict | None = None) -> dict:
        import subprocess
        completed = subprocess.run(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", kind, contender, self.base,
             str(directory)], capture_output=True, text=True, timeout=900,
            env=dict(os.environ, BENCH_COUNT=str(count), BENCH_SEED=str(seed), **(env or {})))
        if completed.returncode != 0:
            raise RuntimeError(f"child {kind} {contender} failed:\n{completed.stderr}")
        return json.loads(completed.stdout.strip().splitlines()[-1])

    def run_coldsmall(self) -> None:
        import shutil
        args = self.args
        count = args.many_urls
        self.section(f"coldsmall: {count} distinct uncached {HIT_BODY_BYTES // 1024} KB URLs fetched one "
                     f"after the other, a fresh process per contender per round (ms per fetch); "
                     f"{args.many_rounds} rounds")
        contenders = COLDSMALL_CONTENDERS + self.pg_contenders("coldsmall")
        per_round = {name: [] for name in contenders}
        for round_index in range(args.many_rounds):
            shift = round_index % len(contenders)
            for position, name in enumerate(contenders[shift:] + contenders[:shift]):
                directory = self.workdir / f"coldsmall-{round_index}-{position}"
                directory.mkdir()
                # Fresh seeds for every contender and round: nothing is cached anywhere.
                seed = 10_000 + (round_index * len(contenders) + position) * count
                schema = env = None
                if name in (PG_BUFFYLITE, PG_RAW["coldsmall"]):
                    schema = f"bench_coldsmall_{round_index}_{'buffylite' if name == PG_BUFFYLITE else 'raw'}"
                    env = self.pg_env(name, schema)
                samples = self._run_many("coldsmall", name, directory, count, seed, env)["samples_us"]
                per_round[name].append((self.lib.median(samples) / 1000,
                                        self.lib.percentile(samples, 0.90) / 1000))
                shutil.rmtree(directory, ignore_errors=True)
                if schema:
                    self.postgres.drop_schema(schema)
        floor = per_round["urllib3 → file"]
        rows, self.coldsmall = [], {}
        for name in contenders:
            ratios = [entry[0] / base[0] for entry, base in zip(per_round[name], floor)]
            median = self.lib.median([entry[0] for entry in per_round[name]])
            p90 = self.lib.median([entry[1] for entry in per_round[name]])
            self.coldsmall[name] = (median, p90, self.lib.median(ratios))
            rows.append([name, f"{median:.2f}", f"{p90:.2f}", fmt_ratio(self.lib.median(ratios)),
                         " ".join(f"{ratio:.1f}" for ratio in ratios)])
        self.lib.print_table(["contender", "median ms", "p90 ms", "ratio vs urllib3 → file",
                              "per-round ratios"], rows)
        if PG_BUFFYLITE in per_round:
            self.coldsmall["pg_vs_raw"] = self.lib.median(
                [entry[0] / base[0] for entry, base in zip(per_round[PG_BUFFYLITE], per_round[PG_RAW["coldsmall"]])])
            print(f"({PG_BUFFYLITE} / {PG_RAW['coldsmall']} (GET + INSERT, a commit each) on the same server: "
                  f"{fmt_ratio(self.coldsmall['pg_vs_raw'])})")
        self.pg_missing_note()

    def run_hitfirst(self) -> None:
        args = self.args
        count = args.many_urls * 5 // 2  # 1,000 with the default 400
        self.section(f"hitfirst: {count} cached {HIT_BODY_BYTES // 1024} KB URLs, each requested once "
                     f"(shuffled) by a fresh process per contender per round (µs per call); "
                     f"{args.many_rounds} rounds")
        seed = 500_000
        contenders = HITFIRST_CONTENDERS + self.pg_contenders("hitfirst")
        directories, envs = {}, {}
        started = time.perf_counter()
        for name in contenders:
            directories[name] = self.workdir / f"hitfirst-{name.replace(' ', '-')}"
            directories[name].mkdir()
            if name in (PG_BUFFYLITE, PG_RAW["hitfirst"]):
                # One store per contender, built once and read by every round (as the others').
                envs[name] = self.pg_env(name, f"bench_hitfirst_{'buffylite' if name == PG_BUFFYLITE else 'raw'}")
            self._run_many("build", name, directories[name], count, seed, envs.get(name))
        print(f"(stores built in {time.perf_counter() - started:.0f} s through each contender's API)",
              flush=True)
        per_round = {name: [] for name in contenders}
        for round_index in range(args.many_rounds):
            shift = round_index % len(contenders)
            for name in contenders[shift:] + contenders[:shift]:
                samples = self._run_many("hitfirst", name, directories[name], count, seed,
                                         envs.get(name))["samples_us"]
                per_round[name].append((self.lib.median(samples), self.lib.percentile(samples, 0.99),
                                        samples[0]))
        floor = per_round["raw sqlite3"]
        rows, self.hitfirst = [], {}
        for name in contenders:
            ratios = [entry[0] / base[0] for entry, base in zip(per_round[name], floor)]
            median, p99, first = (self.lib.median([entry[index] for entry in per_round[name]])
                                  for index in range(3))
            self.hitfirst[name] = (median, p99, self.lib.median(ratios), first)
            rows.append([name, fmt_us(median), fmt_us(p99), fmt_us(first), fmt_ratio(self.lib.median(ratios)),
                         " ".join(f"{ratio:.1f}" for ratio in ratios)])
        self.lib.print_table(["contender", "median µs", "p99 µs", "first call µs", "ratio vs raw sqlite3",
                              "per-round ratios"], rows)
        gets = self._origin_gets(seed, count)
        print(f"(origin: {gets} GETs of these URLs in all = {len(contenders)} stores × {count} "
              f"while building; the timed rounds sent {gets - len(contenders) * count})")
        if PG_BUFFYLITE in per_round:
            self.hitfirst["pg_vs_raw"] = self.lib.median(
                [entry[0] / base[0] for entry, base in zip(per_round[PG_BUFFYLITE], per_round[PG_RAW["hitfirst"]])])
            print(f"({PG_BUFFYLITE} / {PG_RAW['hitfirst']} on the same server: "
                  f"{fmt_ratio(self.hitfirst['pg_vs_raw'])})")
        self.pg_missing_note()

    def _origin_gets(self, seed: int, count: int) -> int:
        """GETs the origin served of the ``count`` 10 KB URLs from ``seed`` on."""
        counts = self.lib.origin_counts(self.base)
        return sum(counts.get(f"/{BODY_ROUTE}/{HIT_BODY_BYTES}?seed={key}", 0) for key in range(seed, seed + count))

    # --- single flight ---------------------------------------------------------------

    def run_flight(self) -> None:
        import subprocess
        import threading
        args = self.args
        self.section(f"single flight: 8 threads + 3 processes fetch one uncached URL at once "
                     f"(origin drips the body over {args.flight_ms} ms)")
        self.flight = {}
        rows = []
        for index, name in enumerate(FLIGHT_CONTENDERS):
            path = f"/slow/262144?seed={100 + index}&ms={args.flight_ms}"
            url = self.base + path
            directory = self.workdir / f"flight-{name}"
            directory.mkdir()
            children = [subprocess.Popen(
                [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", "flight", name, url,
                 str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True) for _ in range(3)]
            results: list = []
            try:
                shared = None
                if name == "buffylite":
                    import buffylite
                    shared = buffylite.Cache(directory / "cache.sqlite3")
                callers = [_flight_caller(name, url, str(directory), shared) for _ in range(8)]
                for child in children:
                    line = child.stdout.readline().strip()
                    if line != "ready":
                        raise RuntimeError(f"flight child failed: {line} {child.stderr.read()}")
                barrier = threading.Barrier(9)

                def run_thread(call):
                    barrier.wait(timeout=60)
                    try:
                        results.append({"sha256": call()})
                    except Exception as exc:  # noqa: BLE001 - reported below
                        results.append({"error": f"{type(exc).__name__}: {exc}"})
                threads = [threading.Thread(target=run_thread, args=(call,)) for call in callers]
                for thread in threads:
                    thread.start()
                for child in children:
                    child.stdin.write("go\n")
                    child.stdin.flush()
                barrier.wait(timeout=60)
                for thread in threads:
                    thread.join(timeout=120)
                for child in children:
                    output, errors = child.communicate(timeout=120)
                    lines = output.strip().splitlines()
                    results.append(json.loads(lines[-1]) if lines else {"error": errors.strip()[-300:]})
                if shared is not None:
                    shared.close()
            finally:
                for child in children:
                    if child.poll() is None:
                        child.kill()
                        child.wait()
            gets = self.lib.origin_counts(self.base).get(path, 0)
            errors = [result["error"] for result in results if "error" in result]
            hashes = {result["sha256"] for result in results if "sha256" in result}
            expected = self.lib.origin.body_sha256(262144, 100 + index)
            self.flight[name] = gets
            rows.append([name, str(gets), f"{len(results) - len(errors)}/11",
                         "yes" if hashes == {expected} else f"no ({len(hashes)} distinct)",
                         "; ".join(errors[:2]) or "—"])
        self.lib.print_table(["contender", "upstream GETs", "callers ok", "same correct content", "errors"],
                             rows)

    # --- summary ---------------------------------------------------------------------

    def print_summary(self) -> None:
        self.section("summary (medians over rounds; ratios computed inside each round)")
        rows = []

        def mark(ok: bool) -> str:
            return "met" if ok else "MISSED"

        def peer(value: str, ratio: float | None) -> str:
            return f"{value} ({fmt_ratio(ratio)})"

        # The PostgreSQL column: "n/a" when it was not measured (the reason is printed below).
        pg_absent = "n/a" if (self.postgres is None or self.buffylite_pg_note is not None) else "—"

        def pg(results: dict, cell) -> str:
            return cell(results[PG_BUFFYLITE]) if PG_BUFFYLITE in results else pg_absent
        if hasattr(self, "hit"):
            hit = self.hit
            rows.append(["hit 10 KB, median µs (p99)",
                         f"{fmt_us(hit['buffylite'][0])} ({fmt_us(hit['buffylite'][1])})",
                         pg(hit, lambda entry: f"{fmt_us(entry[0])} ({fmt_us(entry[1])}; {fmt_ratio(entry[2])})"),
                         f"{fmt_us(hit['raw sqlite3'][0])} ({fmt_us(hit['raw sqlite3'][1])})", "—",
                         *[peer(fmt_us(hit[name][0]), hit[name][2]) for name in ("diskcache", "pooch",
                                                                                  "requests-cache")],
                         fmt_ratio(hit["buffylite"][2]), "≤ 4×", mark(hit["buffylite"][2] <= 4)])
        if hasattr(self, "cold"):
            cold = self.cold
            mib = self.args.cold_mib
            rows.append([f"cold {mib} MiB, s", f"{cold['buffylite']['seconds']:.2f}",
                         pg(cold, lambda entry: peer(f"{entry['seconds']:.2f}", entry["ratio"])),
                         f"{cold['urllib3']['seconds']:.2f}",
                         *[peer(f"{cold[name]['seconds']:.2f}", cold[name]["ratio"])
                           for name in ("sqlite3 chunks",)], "—",
                         *[peer(f"{cold[name]['seconds']:.2f}", cold[name]["ratio"])
                           for name in ("pooch", "requests-cache")],
                         fmt_ratio(cold["buffylite"]["ratio"]), "—", ""])
            # The target of a resumable one-file design: raw sqlite3 in WAL, one commit per
            # 1 MiB chunk and a final checkpoint ("sqlite3 chunks"), same run. For
            # buffylite-pg the same comparison is with "pg chunks" (raw psycopg, same server).
            versus_floor = cold["buffylite"]["seconds"] / cold["sqlite3 chunks"]["seconds"]
            rows.append([f"cold {mib} MiB vs sqlite3 chunks (pg: vs pg chunks)", fmt_ratio(versus_floor),
                         fmt_ratio(cold["pg_vs_raw"]) if "pg_vs_raw" in cold else pg_absent, "—",
                         f"{cold['sqlite3 chunks']['seconds']:.2f}", "—", "—", "—", "—", "≤ 1.1×",
                         mark(versus_floor <= 1.1)])
            rows.append([f"cold {mib} MiB, peak RSS − after imports, MiB",
                         f"+{cold['buffylite']['growth_mib']:.1f}",
                         pg(cold, lambda entry: f"+{entry['growth_mib']:.1f}"),
                         f"+{cold['urllib3']['growth_mib']:.1f}",
                         f"+{cold['sqlite3 chunks']['growth_mib']:.1f}", "—",
                         *[f"+{cold[name]['growth_mib']:.1f}" for name in ("pooch", "requests-cache")],
                         "—", "≤ +32 MiB", mark(cold["buffylite"]["growth_mib"] <= 32)])
        if hasattr(self, "read"):
            read = self.read
            rows.append([f"read-back {self.args.cold_mib} MiB, ms", f"{read['buffylite'][0] * 1000:.0f}",
                         pg(read, lambda entry: peer(f"{entry[0] * 1000:.0f}", entry[1])),
                         f"{read['plain file'][0] * 1000:.0f}",
                         peer(f"{read['sqlite3 chunks'][0] * 1000:.0f}", read["sqlite3 chunks"][1]),
                         "—", "= plain file",
                         peer(f"{read['requests-cache'][0] * 1000:.0f}", read["requests-cache"][1]),
                         fmt_ratio(read["buffylite"][1]), "≤ 2.5×", mark(read["buffylite"][1] <= 2.5)])
        if hasattr(self, "scale"):
            scale = self.scale
            label = f"{scale['big_n']:,}"
            rows.append([f"hit at {label} vs 10 requests", fmt_ratio(scale["hit_ratio"]), "—",
                         fmt_ratio(scale["raw_ratio"]), "—", "—", "—", "—", "—", "≤ 1.10",
                         mark(scale["hit_ratio"] <= 1.10)])
            rows.append([f"gc of one request at {label} vs 10", fmt_ratio(scale["gc_ratio"]),
                         "—", "—", "—", "—", "—", "—", "—", "≤ 1.5", mark(scale["gc_ratio"] <= 1.5)])
        if hasattr(self, "coldsmall"):
            cold = self.coldsmall
            rows.append([f"coldsmall {self.args.many_urls} × 10 KB, ms per fetch (p90)",
                         f"{cold['buffylite'][0]:.2f} ({cold['buffylite'][1]:.2f})",
                         pg(cold, lambda entry: f"{entry[0]:.2f} ({entry[1]:.2f}; {fmt_ratio(entry[2])})"),
                         f"{cold['urllib3 → file'][0]:.2f}",
                         peer(f"{cold['raw sqlite3'][0]:.2f}", cold["raw sqlite3"][2]),
                         *[peer(f"{cold[name][0]:.2f}", cold[name][2]) for name in ("diskcache", "pooch",
                                                                                    "requests-cache")],
                         fmt_ratio(cold["buffylite"][2]), "≤ 1.5×", mark(cold["buffylite"][2] <= 1.5)])
        if hasattr(self, "hitfirst"):
            first = self.hitfirst
            rows.append(["hitfirst, median µs (p99)",
                         f"{fmt_us(first['buffylite'][0])} ({fmt_us(first['buffylite'][1])})",
                         pg(first, lambda entry: f"{fmt_us(entry[0])} ({fmt_us(entry[1])}; {fmt_ratio(entry[2])})"),
                         f"{fmt_us(first['raw sqlite3'][0])}", "—",
                         *[peer(fmt_us(first[name][0]), first[name][2]) for name in ("diskcache", "pooch",
                                                                                     "requests-cache")],
                         fmt_ratio(first["buffylite"][2]), "≤ 2×", mark(first["buffylite"][2] <= 2)])
            rows.append(["first call in a fresh process, µs", fmt_us(first["buffylite"][3]),
                         pg(first, lambda entry: fmt_us(entry[3])),
                         fmt_us(first["raw sqlite3"][3]), "—",
                         *[fmt_us(first[name][3]) for name in ("diskcache", "pooch", "requests-cache")],
                         "—", "≤ 1,000 µs", mark(first["buffylite"][3] <= 1000)])
        pg_versus_raw = [(name, results["pg_vs_raw"]) for name, results in
                         (("hit", getattr(self, "hit", {})), ("cold", getattr(self, "cold", {})),
                          ("coldsmall", getattr(self, "coldsmall", {})), ("hitfirst", getattr(self, "hitfirst", {})))
                         if "pg_vs_raw" in results]
        if pg_versus_raw:
            rows.append([f"{PG_BUFFYLITE} vs raw psycopg, same server ({', '.join(name for name, _ in pg_versus_raw)})",
                         "—", " / ".join(fmt_ratio(ratio) for _, ratio in pg_versus_raw),
                         "—", "—", "—", "—", "—", "—", "—", ""])
        if hasattr(self, "flight"):
            flight = self.flight
            rows.append(["single flight, upstream GETs (11 callers)", str(flight["buffylite"]),
                         "—", "—", "—", "—", str(flight["pooch"]), str(flight["requests-cache"]), "—", "exactly 1",
                         mark(flight["buffylite"] == 1)])
        self.lib.print_table(["measure", "buffylite", PG_BUFFYLITE, "floor", "sqlite3 chunks", "diskcache", "pooch",
                              "requests-cache", "buffylite/floor", "target", ""], rows)
        print("floor: raw sqlite3 PK SELECT (hit; scale: the same at both sizes); urllib3 → file + sha256 "
              "(cold); plain file reads (read-back); urllib3 → file + sha256 (coldsmall); raw sqlite3 SELECT in a fresh process (hitfirst).\nsqlite3 chunks: the storage floor of buffylite's "
              "design (1 MiB rows, a transaction each; read with one cursor). Peer cells: value (ratio to "
              f"the floor).\n{PG_BUFFYLITE}: buffylite on PostgreSQL; its cells: value (ratio to the same floor as "
              "buffylite's).")
        if self.postgres is None:
            print(f"{PG_BUFFYLITE}: not measured: {self.postgres_note}")
        elif self.buffylite_pg_note is not None:
            print(f"{PG_BUFFYLITE}: not measured: {self.buffylite_pg_note}")
        else:
            print(f"{PG_BUFFYLITE}: {self.postgres.description}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: 32 MiB cold body, 1,000 requests for scale, fewer rounds")
    parser.add_argument("--sections", default="hit,cold,coldsmall,hitfirst,scale,flight",
                        help="comma-separated subset of hit,cold,coldsmall,hitfirst,scale,flight")
    parser.add_argument("--many-urls", type=int,
                        help="URLs per coldsmall run (default 400; quick 100); hitfirst stores 2.5× as many")
    parser.add_argument("--many-rounds", type=int, help="coldsmall and hitfirst rounds (default 5; quick 2)")
    parser.add_argument("--rounds", type=int, help="rounds for hit and scale (default 7; quick 3)")
    parser.add_argument("--hit-calls", type=int, help="timed calls per contender per round (default 2000)")
    parser.add_argument("--cold-mib", type=int, help="size of the cold body (default 256; quick 32)")
    parser.add_argument("--cold-rounds", type=int, help="cold rounds (default 3; quick 2)")
    parser.add_argument("--scale-requests", type=int, help="requests in the big cache (default 10000; quick 1000)")
    parser.add_argument("--flight-ms", type=int, help="how long the origin drips the single-flight body")
    parser.add_argument("--no-postgres", action="store_true",
                        help=f"leave out the PostgreSQL column ({PG_BUFFYLITE} and the raw psycopg floors)")
    parser.add_argument("--postgres-url", help="an existing PostgreSQL server for that column, "
                        "postgresql://user:password@host:port/db (default: $BUFFYLITE_BENCH_POSTGRES_URL, "
                        "else a throwaway PostgreSQL 15 started for the run)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "CONTENDER", "URL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, contender, url, directory = args.child
        if kind in ("coldsmall", "hitfirst", "build"):
            child_many(kind, contender, url, directory)
        else:
            (child_cold if kind == "cold" else child_flight)(contender, url, directory)
        return

    quick = args.quick
    defaults = {"rounds": 3 if quick else 7, "hit_calls": 300 if quick else 2000,
                "cold_mib": 32 if quick else 256, "cold_rounds": 2 if quick else 3,
                "scale_requests": 1000 if quick else 10_000, "flight_ms": 800 if quick else 1500,
                "many_urls": 100 if quick else 400, "many_rounds": 2 if quick else 5}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.hit_cap_sec = 0.4 if quick else 2.0
    args.read_reps = 2 if quick else 3
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]

    import contextlib
    import shutil
    import tempfile

    import _benchlib
    print(f"buffylite peers benchmark — {_benchlib.machine_description()}")
    shown_argv = [_benchlib.hide_password(arg) for arg in sys.argv]
    print(f"command: {' '.join([os.path.relpath(sys.executable)] + shown_argv)}")
    started = time.perf_counter()
    origin_process, base_url = _benchlib.start_origin()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="buffylite-peers-"))
    try:
        with contextlib.ExitStack() as stack:
            postgres, postgres_note, buffylite_pg_note = _start_postgres(args, sections, stack)
            bench = Bench(args, base_url, workdir, postgres, postgres_note, buffylite_pg_note)
            _run_sections(bench, sections)
    finally:
        _benchlib.stop_origin(origin_process)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


def _start_postgres(args, sections: list[str], stack) -> tuple:
    """The PostgreSQL column's server, entered on ``stack`` (stopped when it closes):
    ``(server or None, why there is none, why buffylite cannot use it)``."""
    import _benchlib
    if args.no_postgres:
        return None, "left out (--no-postgres)", None
    if not {"hit", "cold", "coldsmall", "hitfirst"} & set(sections):
        return None, "no section with a PostgreSQL contender was run", None
    try:
        server = stack.enter_context(_benchlib.postgres_server(args.postgres_url))
    except _benchlib.PostgresUnavailable as exc:
        reason = " ".join(str(exc).split())
        print(f"PostgreSQL: none available: {reason}", flush=True)
        return None, f"no PostgreSQL server: {reason}", None
    print(f"PostgreSQL: {server.description}", flush=True)
    import buffylite
    probe = "bench_probe"
    try:
        with buffylite.Cache(server.url(probe)) as cache:
            cache.stats()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the column says it and the rest runs
        note = f"buffylite cannot use the server: {type(exc).__name__}: {' '.join(str(exc).split())}"
        print(f"PostgreSQL: {note}", flush=True)
        return server, None, note
    finally:
        server.drop_schema(probe)
    return server, None, None


def _run_sections(bench: Bench, sections: list[str]) -> None:
    """Run the chosen sections in their fixed order, then the summary."""
    for name in ("hit", "cold", "coldsmall", "hitfirst", "scale", "flight"):
        if name in sections:
            getattr(bench, f"run_{name}")()
    bench.print_summary()


if __name__ == "__main__":
    main()
