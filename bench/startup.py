"""Start-up time of buffylite: its own import time, and a whole cached command-line fetch
against importing its three dependencies.

    .venv/bin/python bench/startup.py            # full: 21 rounds, 15 -X importtime runs (~30 s)
    .venv/bin/python bench/startup.py --quick    # about 12 seconds: 7 rounds, 7 runs

Targets (SPEC §2, §15):

- **import self time** <= 20 ms: the first column of the ``| buffylite`` line of
  ``python -X importtime -c "import buffylite"`` (what buffylite's own module body costs,
  its dependencies' imports not included), median of N fresh processes (best shown too).
- **cached CLI fetch** <= 1.3 x deps: a whole ``python -m buffylite --cache FILE fetch URL``
  process (the URL already cached, the content written to stdout, a pipe here) against
  a whole ``python -c "import pydantic, urllib3, peewee"`` process, the ratio computed
  inside each round, median over rounds.

Each round runs one fresh process of every contender, in an order that rotates round by
round (the machine is shared and noisy: absolute times drift, ratios inside a round
hold): ``python -c pass`` (the interpreter alone), the dependencies' import,
``import buffylite``, the cached fetch, ``python -m buffylite --help``, and for
information the same cached fetch through ``buffylite.main(argv)``, which leaves out what
``main()`` does only when run as the program (``gc.freeze()`` of the imports' objects). Wall time is
measured around ``subprocess.run`` (fork, exec, interpreter start-up and exit included).

Bytecode is written and used, as for an installed package: the script drops
``PYTHONDONTWRITEBYTECODE`` from the children's environment and points
``PYTHONPYCACHEPREFIX`` at a temporary directory, and every contender runs once untimed
first so the ``.pyc`` files exist before the first timed round. The children import the
buffylite.py next to this script (``PYTHONPATH``). The origin is the loopback bench
origin in its own process (``_benchlib.start_origin()``); the 64 KiB body is fetched once
into a cache file in the temporary directory before timing, and every timed fetch is
checked to answer ``(cached)`` with the same bytes. Temporary files are removed at the
end and the origin is stopped.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _benchlib  # noqa: E402

#: Targets: buffylite's own import time, and the cached CLI fetch over the deps' import.
IMPORT_SELF_TARGET_MS = 20.0
CLI_FETCH_RATIO_TARGET = 1.3
BODY_BYTES = 64 * 1024
DEPS = "import pydantic, urllib3, peewee"


def contenders(cache_file: pathlib.Path, url: str) -> dict[str, list[str]]:
    """Name -> the child's argument list (after the interpreter)."""
    return {
        "python -c pass": ["-c", "pass"],
        "import deps": ["-c", DEPS],
        "import buffylite": ["-c", "import buffylite"],
        "cached CLI fetch": ["-m", "buffylite", "--cache", str(cache_file), "fetch", url],
        "buffylite --help": ["-m", "buffylite", "--help"],
        # For information: the same fetch through main(argv), which does not freeze the
        # imports' objects (only main() run as the program does): what gc.freeze() saves.
        "fetch, no gc.freeze": ["-c", "import sys, buffylite; sys.exit(buffylite.main(sys.argv[1:]))",
                                "--cache", str(cache_file), "fetch", url],
    }


def child_environment(pycache: pathlib.Path) -> dict[str, str]:
    """This environment with bytecode written to ``pycache`` and buffylite importable."""
    environment = dict(os.environ)
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    environment["PYTHONPYCACHEPREFIX"] = str(pycache)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), environment.get("PYTHONPATH")]))
    return environment


def run_child(arguments: list[str], environment: dict[str, str], *, check_stdout: bytes | None = None,
              importtime: bool = False) -> tuple[float, subprocess.CompletedProcess]:
    """Run one fresh interpreter; wall seconds and the completed process. Output goes to
    pipes (the content of a fetch to a pipe as in ``| consumer``)."""
    command = [sys.executable] + (["-X", "importtime"] if importtime else []) + arguments
    started = time.perf_counter()
    completed = subprocess.run(command, env=environment, capture_output=True, timeout=120, cwd=HERE.parent)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {completed.returncode}):\n"
                         f"{completed.stderr.decode(errors='replace')[-2000:]}")
    if check_stdout is not None:
        if completed.stdout != check_stdout:
            raise SystemExit(f"{' '.join(command)} wrote {len(completed.stdout)} bytes, not the cached body.")
        if b"(cached)" not in completed.stderr:
            raise SystemExit(f"{' '.join(command)} did not answer from the cache: "
                             f"{completed.stderr.decode(errors='replace').strip()}")
    return seconds, completed


_SELF_LINE = re.compile(rb"import time:\s+(\d+) \|\s+(\d+) \| buffylite\s*$", re.MULTILINE)


def import_self_ms(environment: dict[str, str]) -> float:
    """buffylite's own (self) import time in ms, from one ``-X importtime`` process."""
    _, completed = run_child(["-c", "import buffylite"], environment, importtime=True)
    match = _SELF_LINE.search(completed.stderr)
    if match is None:
        raise SystemExit("no '| buffylite' line in the -X importtime output")
    return int(match.group(1)) / 1000


def verdict(value: float, target: float) -> str:
    return "MET" if value <= target else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="7 rounds and 7 -X importtime runs")
    parser.add_argument("--rounds", type=int, help="timed rounds of every contender (default 21; quick 7)")
    parser.add_argument("--importtime-runs", type=int, help="-X importtime processes (default 15; quick 7)")
    args = parser.parse_args()
    rounds = args.rounds or (7 if args.quick else 21)
    importtime_runs = args.importtime_runs or (7 if args.quick else 15)

    print(_benchlib.machine_description())
    root = pathlib.Path(tempfile.mkdtemp(prefix="buffylite-bench-startup-"))
    origin_process, base_url = _benchlib.start_origin()
    try:
        environment = child_environment(root / "pycache")
        cache_file = root / "cache.sqlite3"
        url = f"{base_url}/noise/{BODY_BYTES}?seed=7"
        # The one download: afterwards every fetch of the URL is served from the file.
        _, first = run_child(["-m", "buffylite", "--cache", str(cache_file), "fetch", url], environment)
        body = first.stdout
        if len(body) != BODY_BYTES:
            raise SystemExit(f"the first fetch wrote {len(body)} bytes, not {BODY_BYTES}")
        children = contenders(cache_file, url)
        expected = {"cached CLI fetch": body, "fetch, no gc.freeze": body}
        for name, arguments in children.items():  # warm-up: bytecode written, files in the page cache
            run_child(arguments, environment, check_stdout=expected.get(name))
        names = list(children)
        times: dict[str, list[float]] = {name: [] for name in names}
        ratios: list[float] = []
        for index in range(rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in order:
                seconds, _ = run_child(children[name], environment, check_stdout=expected.get(name))
                times[name].append(seconds)
            ratios.append(times["cached CLI fetch"][-1] / times["import deps"][-1])
        self_times = [import_self_ms(environment) for _ in range(importtime_runs)]
    finally:
        _benchlib.stop_origin(origin_process)
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{rounds} rounds of fresh processes (order rotating), median wall time per process:")
    deps_ms = _benchlib.median(times["import deps"]) * 1000
    rows = []
    for name in names:
        milliseconds = _benchlib.median(times[name]) * 1000
        shown = {"cached CLI fetch": "python -m buffylite --cache TMP/cache.sqlite3 fetch URL",
                 "fetch, no gc.freeze": "python -c 'import sys, buffylite; sys.exit(buffylite.main(sys.argv[1:]))' "
                                        "--cache TMP/cache.sqlite3 fetch URL"}
        rows.append([name, shown.get(name, " ".join(["python"] + children[name])),
                     f"{milliseconds:.0f}", f"{milliseconds / deps_ms:.2f}"])
    _benchlib.print_table(["contender", "command", "median ms", "/ deps"], rows, align="llrr")

    ratio = _benchlib.median(ratios)
    self_median, self_best = _benchlib.median(self_times), min(self_times)
    print("\nTargets:")
    _benchlib.print_table(
        ["measure", "value", "target", ""],
        [[f"import self time (-X importtime, median of {importtime_runs}; best {self_best:.1f} ms)",
          f"{self_median:.1f} ms", f"<= {IMPORT_SELF_TARGET_MS:g} ms", verdict(self_median, IMPORT_SELF_TARGET_MS)],
         [f"cached CLI fetch / import deps (median of {rounds} in-round ratios)",
          f"{ratio:.2f}x", f"<= {CLI_FETCH_RATIO_TARGET:g}x", verdict(ratio, CLI_FETCH_RATIO_TARGET)]],
        align="lrrl")


if __name__ == "__main__":
    main()
