"""How PostgreSQL should store buffylite's content chunks: TOAST with or without compression.

    .venv/bin/python bench/pg_toast.py                 # 256 MiB per run, 5 rounds
    .venv/bin/python bench/pg_toast.py --mib 32 --rounds 2
    .venv/bin/python bench/pg_toast.py --postgres-url postgresql://u:pw@host/db

A content is stored the way buffylite's PostgreSQL store keeps it: a table
``chunk(content_id int, seq int, data bytea, unique (content_id, seq))``, 1 MiB per
row, one commit per row (autocommit: a crash loses at most the chunk being written).
A 1 MiB ``bytea`` is always moved out of line into the table's TOAST relation; what
differs is whether PostgreSQL first tries to compress it:

- ``extended`` (the column default): compressed with ``default_toast_compression``
  (pglz unless configured) when that saves at least a quarter;
- ``extended lz4``: the same with ``ALTER COLUMN data SET COMPRESSION lz4`` (shown when
  the server was built with lz4);
- ``external``: ``ALTER COLUMN data SET STORAGE EXTERNAL``, out of line, never compressed.

Two contents of ``--mib`` MiB each, made up locally from fixed seeds:

- ``compressed``: random bytes, which is what already-compressed downloads (archives,
  images, parquet, .gz) look like to a compressor;
- ``text``: JSON lines (ids, timestamps, words, numbers), about 5.7× compressible by gzip.

For every content × storage, in each round (the order rotates every round): the table is
dropped and created, a ``CHECKPOINT`` is taken (when allowed) so every write starts from
the same state, then timed: the write (one INSERT and commit per chunk, the data sent in
binary); the read-back streaming by ``seq``, one ``SELECT data ... WHERE content_id = %s
AND seq = %s`` per chunk as ``Response.open()`` reads, once with the result in binary and
once in text format (what a driver that does not ask for binary receives: hex, twice the
bytes, parsed on the client); the on-disk size (``pg_total_relation_size``: heap, TOAST
and index) and the WAL the write produced. Each read compares every chunk with what was
written. Medians over the rounds; the comparisons with ``external`` are ratios taken
inside each round, then their median; then a recommendation.

The server is a throwaway PostgreSQL 15 with default settings (``fsync`` on) in a
temporary directory, started and stopped here (``bench/_benchlib.py``), unless
``--postgres-url`` or ``$BUFFYLITE_BENCH_POSTGRES_URL`` names one; on a given server the
benchmark uses its own schema and drops it at the end.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import time
import zlib

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _benchlib  # noqa: E402

CHUNK_BYTES = 1 << 20
SCHEMA = "buffylite_bench_toast"
CONTENT_ID = 1

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon phi chi psi omega").split()
_CITIES = ("Berlin", "Lisbon", "Osaka", "Quito", "Nairobi", "Perth", "Oslo", "Lima", "Hanoi", "Austin")
_STATUSES = ("ok", "failed", "pending")


def random_chunk(seed: int) -> bytes:
    """1 MiB of seeded random bytes: incompressible, like an archive or an image."""
    return random.Random(seed).randbytes(CHUNK_BYTES)


def text_chunk(seed: int) -> bytes:
    """1 MiB of made-up JSON lines (seeded): about 5.7× compressible by gzip."""
    rng = random.Random(seed)
    lines, size, number = [], 0, seed * 100_000
    while size < CHUNK_BYTES:
        line = ('{"id":%d,"ts":"2026-%02d-%02dT%02d:%02d:%02dZ","user":"%s_%s","city":"%s",'
                '"amount":%d.%02d,"status":"%s","tags":["%s","%s"]}\n') % (
            number, rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59),
            rng.randint(0, 59), rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(_CITIES),
            rng.randint(0, 9999), rng.randint(0, 99), rng.choice(_STATUSES), rng.choice(_WORDS),
            rng.choice(_WORDS))
        lines.append(line)
        size += len(line)
        number += 1
    return "".join(lines).encode()[:CHUNK_BYTES]


CONTENTS = {"compressed": random_chunk, "text": text_chunk}


def storage_variants(connection) -> dict[str, list[str]]:
    """Storage name -> the ALTER statements that set it up on a new ``chunk`` table."""
    variants = {"extended": [], "external": ["ALTER TABLE chunk ALTER COLUMN data SET STORAGE EXTERNAL"]}
    try:
        with connection.transaction():
            connection.execute("CREATE TEMPORARY TABLE lz4_probe (data bytea COMPRESSION lz4)")
            connection.execute("DROP TABLE lz4_probe")
        variants["extended lz4"] = ["ALTER TABLE chunk ALTER COLUMN data SET COMPRESSION lz4"]
    except Exception:  # noqa: BLE001 - a server without lz4 just has no such variant
        pass
    return variants


def _checkpoint(connection) -> bool:
    """Take a CHECKPOINT if this role may; returns whether it did."""
    try:
        connection.execute("CHECKPOINT")
        return True
    except Exception:  # noqa: BLE001 - insufficient privilege on a given server
        return False


def run_once(connection, chunks: list[bytes], alters: list[str]) -> dict:
    """Create the table, write ``chunks``, read them back twice; returns the measures."""
    connection.execute("DROP TABLE IF EXISTS chunk")
    connection.execute("CREATE TABLE chunk (content_id integer NOT NULL, seq integer NOT NULL, "
                       "data bytea NOT NULL, UNIQUE (content_id, seq))")
    for statement in alters:
        connection.execute(statement)
    checkpointed = _checkpoint(connection)
    wal_before = connection.execute("SELECT pg_current_wal_lsn()").fetchone()[0]

    # Write: one INSERT and one commit per chunk (the connection is in autocommit).
    started = time.perf_counter()
    with connection.cursor() as cursor:
        for seq, data in enumerate(chunks):
            cursor.execute("INSERT INTO chunk (content_id, seq, data) VALUES (%s, %s, %b)",
                           (CONTENT_ID, seq, data))
    write_sec = time.perf_counter() - started
    wal_bytes = connection.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)",
                                   (str(wal_before),)).fetchone()[0]

    def read_back(binary: bool) -> float:
        begun = time.perf_counter()
        with connection.cursor(binary=binary) as cursor:
            for seq, data in enumerate(chunks):
                cursor.execute("SELECT data FROM chunk WHERE content_id = %s AND seq = %s", (CONTENT_ID, seq))
                stored = cursor.fetchone()[0]
                if stored != data:
                    raise RuntimeError(f"chunk {seq} read back differs from what was written")
        return time.perf_counter() - begun

    read_binary_sec = read_back(True)
    read_text_sec = read_back(False)
    size = connection.execute("SELECT pg_total_relation_size('chunk')").fetchone()[0]
    compressed_rows = connection.execute(
        "SELECT count(*) FROM chunk WHERE pg_column_compression(data) IS NOT NULL").fetchone()[0]
    return {"write": write_sec, "read_binary": read_binary_sec, "read_text": read_text_sec,
            "size": size, "wal": float(wal_bytes), "compressed_rows": compressed_rows,
            "checkpointed": checkpointed}


def ratios_to_external(per_round: dict, storages: list[str]) -> dict:
    """(content, storage) -> {measure: median over rounds of the ratio to ``external`` in
    the same round}: machines are shared, so absolute times drift between rounds."""
    ratios = {}
    for content in CONTENTS:
        base = per_round[(content, "external")]
        for storage in storages:
            entries = per_round[(content, storage)]
            ratios[(content, storage)] = {
                key: _benchlib.median([entry[key] / reference[key] for entry, reference in zip(entries, base)])
                for key in ("write", "read_binary", "size")}
    return ratios


def recommend(ratios: dict, storages: list[str]) -> list[str]:
    """Sentences comparing each storage with ``external``, and the choice: the storage that
    saves the most disk on text among those that cost at most 10% more write time on
    already-compressed bytes and 25% more on text; EXTERNAL when none saves 30%."""
    lines = []
    others = [storage for storage in storages if storage != "external"]
    for storage in others:
        for content in CONTENTS:
            ratio = ratios[(content, storage)]
            lines.append(f"- {content}, {storage} vs external: write {ratio['write']:.2f}×, "
                         f"read {ratio['read_binary']:.2f}×, on disk {ratio['size']:.2f}×")
    affordable = [storage for storage in others if ratios[("compressed", storage)]["write"] <= 1.10
                  and ratios[("text", storage)]["write"] <= 1.25]
    best = min(affordable, key=lambda storage: ratios[("text", storage)]["size"], default=None)
    if best is not None and ratios[("text", best)]["size"] <= 0.7:
        lines.append(f"Recommendation: {best}: on already-compressed bytes it writes at "
                     f"{ratios[('compressed', best)]['write']:.2f}× the time of EXTERNAL (an incompressible "
                     f"chunk is stored as it is), and on text it keeps {ratios[('text', best)]['size']:.0%} "
                     f"of the disk "
                     f"for {ratios[('text', best)]['write']:.2f}× the write time.")
        if best == "extended lz4":
            # lz4 needs PostgreSQL 14+ built with it; say what to do on a server without it.
            pglz_ok = (ratios[("compressed", "extended")]["write"] <= 1.10
                       and ratios[("text", "extended")]["write"] <= 1.25)
            lines.append("On a server without lz4 (SET COMPRESSION lz4 fails): "
                         + ("keep the default (pglz)." if pglz_ok else
                            f"SET STORAGE EXTERNAL (pglz writes text at {ratios[('text', 'extended')]['write']:.2f}× "
                            f"the time of EXTERNAL)."))
    else:
        costs = "; ".join(f"{storage}: {ratios[('compressed', storage)]['write']:.2f}× on compressed bytes, "
                          f"{ratios[('text', storage)]['write']:.2f}× on text" for storage in others)
        lines.append(f"Recommendation: ALTER COLUMN data SET STORAGE EXTERNAL: compression costs more write "
                     f"time than a download cache, whose contents are mostly already compressed, should pay "
                     f"(write time relative to EXTERNAL: {costs}).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--mib", type=int, default=256, help="MiB per content (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--no-lz4", action="store_true", help="leave out the 'extended lz4' storage")
    parser.add_argument("--postgres-url", help=f"an existing server (default: ${_benchlib.POSTGRES_URL_ENV}, "
                                               "else a throwaway PostgreSQL 15)")
    args = parser.parse_args()
    print(f"PostgreSQL TOAST for content chunks — {_benchlib.machine_description()}")
    shown_argv = [_benchlib.hide_password(arg) for arg in sys.argv]
    print(f"command: {' '.join([os.path.relpath(sys.executable)] + shown_argv)}")
    started = time.perf_counter()
    contents = {}
    for name, make in CONTENTS.items():
        contents[name] = [make(seed) for seed in range(args.mib)]
        sample = b"".join(contents[name][:4])
        print(f"content {name}: {args.mib} MiB, gzip -6 ratio of its first 4 MiB "
              f"{len(sample) / len(zlib.compress(sample, 6)):.2f}×", flush=True)
    with _benchlib.postgres_server(args.postgres_url) as server:
        print(server.description, flush=True)
        if not server.owned:
            server.schemas.append(SCHEMA)  # dropped at the end: a given server keeps nothing
        with server.connect(autocommit=True) as connection:
            connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')
            connection.execute(f'SET search_path TO "{SCHEMA}"')
            storages = storage_variants(connection)
            if args.no_lz4:
                storages.pop("extended lz4", None)
            print(f"default_toast_compression = "
                  f"{connection.execute('SHOW default_toast_compression').fetchone()[0]}; storages: "
                  f"{', '.join(storages)}", flush=True)
            variants = [(content, storage) for content in CONTENTS for storage in storages]
            # Untimed warm-up of every variant on a few chunks (connections, caches, plans).
            for content, storage in variants:
                run_once(connection, contents[content][:8], storages[storage])
            per_round = {variant: [] for variant in variants}
            for round_index in range(args.rounds):
                shift = round_index % len(variants)
                for content, storage in variants[shift:] + variants[:shift]:
                    result = run_once(connection, contents[content], storages[storage])
                    per_round[(content, storage)].append(result)
                    print(f"  round {round_index + 1} {content:10} {storage:12} write {result['write']:6.2f} s  "
                          f"read {result['read_binary']:5.2f} s (text {result['read_text']:5.2f} s)  "
                          f"{result['size'] / 2**20:6.1f} MiB on disk, WAL {result['wal'] / 2**20:6.1f} MiB, "
                          f"{result['compressed_rows']}/{args.mib} chunks compressed", flush=True)
            connection.execute("DROP TABLE IF EXISTS chunk")
            if not per_round[variants[0]][0]["checkpointed"]:
                print("(this role may not CHECKPOINT: writes did not start from a fresh checkpoint)")
    medians = {variant: {key: _benchlib.median([entry[key] for entry in entries])
                         for key in ("write", "read_binary", "read_text", "size", "wal", "compressed_rows")}
               for variant, entries in per_round.items()}
    print(f"\n== TOAST for {args.mib} MiB in 1 MiB chunks, one commit each; medians of {args.rounds} rounds")
    rows = []
    for content, storage in variants:
        median = medians[(content, storage)]
        writes = " ".join(f"{entry['write']:.2f}" for entry in per_round[(content, storage)])
        rows.append([content, storage, f"{median['write']:.2f}", f"{args.mib / median['write']:.0f}",
                     f"{median['read_binary']:.2f}", f"{args.mib / median['read_binary']:.0f}",
                     f"{median['read_text']:.2f}", f"{median['size'] / 2**20:.1f}",
                     f"{median['wal'] / 2**20:.0f}", f"{median['compressed_rows']:.0f}/{args.mib}", writes])
    _benchlib.print_table(["content", "storage", "write s", "MiB/s", "read s", "MiB/s", "read text-format s",
                           "on disk MiB", "WAL MiB", "compressed", "per-round write s"], rows,
                          align="llrrrrrrrrl")
    print()
    for line in recommend(ratios_to_external(per_round, list(storages)), list(storages)):
        print(line)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
