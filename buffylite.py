"""buffylite: a versioning HTTP download cache in one SQLite file.

buffylite downloads a URL once, keeps every version of its content in a single
SQLite file, and hands back the right version on every later call: the newest
one, a pinned one, a tagged one, the one that was current last Tuesday. When
the origin changes, breaks, rate-limits or disappears, the last good version is
still there. It is the serverless descendant of Buffy (PyPI ``DZDBuffy``) and
keeps Buffy's model: versions, pins, tags, re-caching strategies and a garbage
collector, with no server to run::

    import buffylite

    resp = buffylite.fetch("https://example.org/ontology.owl")
    print(resp.version, resp.outcome)          # 20261129084211123456 downloaded
    with resp.open() as stream:                # streamed from SQLite
        header = stream.read(1024)

For asyncio, ``AsyncCache`` offers the same methods as coroutines, running the
blocking work in worker threads (``await acache.fetch(url)``, ``await resp.aread()``,
``async with resp.aopen() as stream``). ``python -m buffylite`` is the command line.

Runtime dependencies: pydantic >= 2.5 (v2), urllib3 >= 2.0 (v2), peewee >= 3.17
(3.x and 4.x).
Optional: croniter (``buffylite[cron]``) for the ``cron`` strategy, tqdm
(``buffylite[progress]``) for a nicer command-line progress bar.

Homepage: https://github.com/buffylite/buffylite
SPDX-License-Identifier: MIT

Design notes (choices the specification leaves open):

- The version chain (``previous_version``/``next_version``) is derived from the
  ordered ``ready`` versions of a request each time a ``Response`` is built,
  never stored, so it cannot disagree with the rows it describes.
- A version string is stamped when the row reaches its final state (ready,
  duplicate or failed), bumped past every version the request already has, so a
  resumed download never lands behind a newer one.
- A download lease lives on the ``wait``/``in_progress`` version row (owner +
  expiry), renewed by a small thread while the download lives, whatever it is
  doing. Other processes never compare that expiry with their own clock: a lease is
  dead when it was given up, or when its value has stood still for the lease time
  on the watching process's monotonic clock, so skewed or jumping clocks cause no
  second download. The price: a fresh process that meets the row of a crashed
  download watches it for about ``download_lease_sec`` before taking over (with a
  cached version and ``prefer_cached`` it serves that at once); ``gc()`` without
  such an observation counts a row abandoned only when its expiry is ten lease
  times past. A dead row's partial content is resumed by a later ``fetch`` when the
  origin still validates it, and reclaimed by ``gc()`` otherwise. Calls that waited for a download get its
  outcome from a note the download leaves on the request (its row may be gone).
- Row ids are never reused, so a Response of a deleted version raises
  NotCachedError instead of reaching newer content.
- A failed download keeps no content; a cancelled one (``progress`` raised)
  keeps its partial content on an abandoned row for a later resume.
- Sensitive header values are replaced by an HMAC-SHA256 digest keyed with a
  random salt stored in the cache file; extra sensitive names given to one
  Cache are remembered by the file. Requests carrying them cannot be replayed
  by ``refresh()`` (their values are not stored); they report ``"error"`` there.
- ``expected_hash`` must use the request's hash type (a new request takes the
  expected hash's algorithm), unless a ready version already has that digest (the
  request's hash type changed since it was stored). Lockfiles name the algorithm of
  each locked version's content.
- ``expected_hash`` with no matching cached version makes a download due, even
  under a strategy that would otherwise serve the cache.
- ``VerifyReport.checked`` counts distinct contents re-hashed.
- ``stats()["content_bytes"]`` counts complete contents; bytes of partial
  downloads kept for resume are reported as ``partial_bytes``. File sizes
  (``stats()``, ``GCReport``) count the main file plus its write-ahead log.
- ``gc()`` truncates the write-ahead log only when no reader holds it; an open
  ``Response.open()`` stream makes it wait at most 0.2 s, not block.
- A body longer than its Content-Length fails at once (it is not retried); a
  shorter one counts as a broken connection and is retried or resumed.
- New cache files use 16 KiB pages (measured faster for large content than
  SQLite's 4 KiB); files made with other page sizes work the same.
- Lockfiles match requests across cache files by their identity without the values
  of sensitive headers (each file digests those with its own salt); such headers
  appear in a lockfile by name with the value ``null``, and the body as JSON, text or
  base64 with a ``body_encoding`` field saying which. ``sync`` cannot replay a request
  whose header or parameter values the lockfile withholds: unless already present, it is
  reported ``missing`` (a fetch that passes them, under ``Cache(lockfile=...)``, gets
  it). Names a lockfile holds without value (``null``, or ``***`` in the URL) count as
  sensitive for ``Cache(lockfile=...)``, which also remembers them in its file.
- ``backup()`` refuses an existing destination (replacing a cache file that is in use
  would corrupt it). A backup by lockfile keeps only the locked versions of the locked
  requests; by group, every version of that group's requests.
- ``import_from()`` and seeds copy ready versions only, with their pins, leases and
  tags, re-hashing the content as it is copied; no garbage collection runs after an
  import. Requests with sensitive header values digested under another file's salt
  cannot be matched and are skipped (a backup shares its cache's salt, so they work there).
  The other file's sensitive names are remembered here; values this file declares
  sensitive but the other holds in clear are digested on the way (they never land here
  in clear). Requests or versions with damaged stored values are skipped and logged,
  and the other file's failure backoff is not copied.
- ``as_of`` takes the version newest at that moment first; ``expected_hash`` (also a
  lockfile's) and ``force_*`` then accept it or raise NotCachedError, never picking an
  older one. ``gc()`` bounds the record of removed versions: per identity, it keeps all
  records ``as_of`` needs to answer honestly and the newest ``REMOVED_VERSION_RECORDS_KEPT``
  (100) of those that only name a version in the error (older than every stored version,
  or of a deleted request).
- A read-only file whose folder cannot be written is opened as immutable when it has
  no ``-wal``/``-shm`` files (SQLite could not create them to read it otherwise). A
  read-only file of an older schema is read as it is, not refused: migrations only add,
  so a seed shipped with an older release keeps working.
- The failure backoff lives on the request row (its end, and the failure as JSON):
  fetch already reads that row on every call, so honouring it costs no query, and it
  goes when the request goes. Its end is set by the Cache that recorded the failure;
  a Cache with ``failure_backoff_sec=0`` neither records nor honours it. Failures of
  the origin or the network start it (connection and read errors, 5xx, 429), content
  rejected here (hash, validator, a 404) does not; any answer from the origin (200,
  304) ends it. A ``Retry-After`` extends it by at most a day. During the backoff,
  ``stale_if_error=False`` raises FetchError at once rather than trying.
- A stale answer says why in ``Response.stale_reason`` (not stored, like
  ``outcome``); ``download_stats`` keep describing the served version's own download.
- The ``http`` strategy follows RFC 9111 section 4.2.3 for the age: ``max(apparent_age,
  Age) + resident_time``; the response delay is not recorded and counts as 0. The
  caching headers are stored with each version and updated by a 304 (RFC 9111
  section 4.3.4); versions stored before schema 3 have none and use the fallback age.
- ``lease()`` blocks that overlap on one version follow one plain rule: the first to
  exit puts back the lease end it found, which may end a shorter lease another
  block asked for meanwhile (that one never extended anything).
- ``AsyncCache`` runs calls in a pool of ``ASYNC_MAX_WORKERS`` threads of its own;
  cancelling an awaiting coroutine does not stop a download already running (it is
  stored). Each ``aopen()`` stream runs on one thread of its own, since a content
  stream's SQLite snapshot belongs to the connection of the thread that opened it.
- A pickled ``Response`` carries its fields, its content id and the absolute path of
  its cache. Unpickling binds it to one ``Cache`` per path per process, opened with
  default settings (reading content needs no others); when the file does not exist
  there, no cache is created and the copy has no content to read.
- An unclosed ``Cache`` releases its connections (those of every thread) and its HTTP
  pool as soon as it is dropped, through a ``weakref.finalize``; the last connection
  to close folds the write-ahead log into the file, so a small cache stays small.
- Model classes list only their own members in ``dir(cls)``, which keeps ``help()``
  short; instances still list pydantic's methods (``model_dump`` and the rest).
- Command line: content "looks binary" when its first 8 KiB hold a NUL byte or are not
  UTF-8; it is then not written to a terminal (exit status 0, one stderr line names
  ``-o -``). ``show URL`` without a version shows the newest ready version, else the
  newest in any state, so a request whose downloads all failed shows why.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------

import base64
import bisect
import codecs
import contextlib
import dataclasses
import datetime as dt
import email.message
import email.utils
import errno
import filecmp
import functools
import hashlib
import hmac
import importlib
import inspect
import io
import ipaddress
import json
import logging
import math
import operator
import os
import pathlib
import random
import re
import secrets
import select
import shutil
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import weakref
import zlib
from typing import Annotated, Any, Callable, Iterator, Literal, Optional, Union

import peewee
import pydantic
import urllib3
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints
from urllib3.util.retry import Retry

try:  # POSIX: file locks serialising writers of a materialised file
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL temp files + link still keep writes atomic
    _fcntl = None

# Modules only some features need (archives, the CLI, AsyncCache, proxies, the optional
# extras croniter and tqdm) are imported where they are used: an import of buffylite
# that only fetches and reads should cost little more than its three dependencies.


def _optional_extra(name: str):
    """The optional module ``name`` (an extra), imported on first use; None when it is
    not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None

__version__ = "0.1.0"

__all__ = sorted([
    "AsyncCache",
    "BuffyliteError",
    "Cache",
    "CacheFileError",
    "FetchError",
    "GCReport",
    "IntegrityError",
    "InvalidRequestError",
    "LockEntry",
    "NotCachedError",
    "ReCachingStrategy",
    "RefreshResult",
    "Request",
    "RequestCacheConfiguration",
    "Response",
    "ResponseContentAttributes",
    "ResponseDownloadStats",
    "SyncReport",
    "VerifyReport",
    "fetch",
    "main",
])

#: The library's logger. A literal name: under ``python -m`` ``__name__`` is ``__main__``.
log = logging.getLogger("buffylite")
log.addHandler(logging.NullHandler())

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: Seconds for connecting and for each read of the origin.
DEFAULT_TIMEOUT_SEC = 30.0
#: Retries after the first attempt of a download.
DEFAULT_RETRIES = 5
#: Cap, in seconds, on any single backoff or Retry-After wait.
DEFAULT_MAX_RETRY_WAIT_SEC = 120.0
#: Lifetime of an in-flight download's lease; renewed while bytes arrive.
DEFAULT_DOWNLOAD_LEASE_SEC = 30.0
#: After a failed download, serve the cached version at once for this long.
DEFAULT_FAILURE_BACKOFF_SEC = 60.0
#: Longest failure backoff, and longest freshness a strategy may name: ~100 years,
#: so every end time stays a datetime the file can hold.
MAX_BACKOFF_SEC = MAX_FRESHNESS_SEC = 100 * 365.25 * 86400
#: A Retry-After may extend the failure backoff by at most this much: an origin's
#: far-future date must not put a request out of reach of its users for good.
MAX_RETRY_AFTER_BACKOFF_SEC = 86400.0
#: Response headers that decide freshness under the ``http`` strategy (RFC 9111),
#: stored with each version.
CACHING_HEADERS = ("cache-control", "expires", "date", "age")
#: First backoff wait; doubled on every further retry (with jitter).
BACKOFF_BASE_SEC = 0.5
#: Redirects followed before a download fails as a redirect loop.
MAX_REDIRECTS = 10
#: Group of requests fetched without ``group=``.
DEFAULT_GROUP = "DEFAULT_GROUP"
#: hashlib algorithm used when a request names none.
DEFAULT_HASH_TYPE = "sha256"
#: Content is stored in rows of this size. 1 MiB keeps the row count of large
#: files low (fewer commits while writing, fewer lookups while reading) while a
#: chunk in memory stays small.
DEFAULT_CHUNK_SIZE_BYTES = 1 << 20
#: Largest single read from the socket; progress and lease renewal run between reads.
READ_SIZE_BYTES = 256 << 10
#: How long SQLite waits for a lock held by another connection before failing.
BUSY_TIMEOUT_SEC = 60.0
#: Shortest and longest pause while polling another process's download.
WAIT_POLL_MIN_SEC = 0.02
WAIT_POLL_MAX_SEC = 0.5
#: Entries in the per-Cache memo of plain request identities (URL, method, group),
#: and in each thread's memo of the rows a fetch reads.
IDENTITY_MEMO_SIZE = 4096
#: Distinct stored cache configurations a Cache keeps parsed.
PARSED_CONFIGURATIONS_KEPT = 64
#: Version of the file layout; see ``_MIGRATIONS``.
SCHEMA_VERSION = 3
#: SQLite ``application_id`` marking a buffylite file ("BUFY").
APPLICATION_ID = 0x42554659
#: SQLite page size of new cache files. Measured with bench/large_download.py on a
#: 256 MiB body: 16 KiB pages store it about 20% faster than the default 4 KiB, at the
#: same read-back speed; 64 KiB pages are faster still but add ~25 MiB of peak memory.
PAGE_SIZE_BYTES = 16384
#: How long gc() waits for readers before giving up on truncating the WAL (ms).
CHECKPOINT_WAIT_MS = 200
#: Size, in bytes, to which SQLite truncates the WAL file after a checkpoint.
WAL_SIZE_LIMIT_BYTES = 64 << 20

#: HTTP methods ``fetch`` accepts (stored lower-case).
HTTP_METHODS = ("get", "post", "put")
#: Life cycle of a version row (Buffy's meanings).
VERSION_STATUSES = ("wait", "in_progress", "ready", "duplicate", "failed")
#: Statuses of a download that is still running (or died while running).
IN_FLIGHT_STATUSES = ("wait", "in_progress")
#: Reasons the garbage collector removes a version row, as reported in GCReport.
GC_REASONS = ("unpinned", "pinned", "duplicate", "failed", "abandoned")
#: Status codes that are retried with backoff (and Retry-After).
RETRY_STATUS_CODES = frozenset({429, 500, 502, 503, 504})
#: Request headers always kept out of the cache file in clear.
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
#: Values of ``$BUFFYLITE_OFFLINE`` that mean offline (any case).
OFFLINE_ENV_VALUES = frozenset({"1", "true", "yes", "on"})
#: ``download_stats.error`` of a version whose content verify() found corrupted.
CORRUPTED_ERROR = "content corrupted"
#: Most lines of ``PRAGMA integrity_check`` a VerifyReport carries.
INTEGRITY_CHECK_MAX_LINES = 100
#: Name given to a saved file when nothing better is known.
FALLBACK_FILENAME = "download"
#: ``Response.unpack()`` refuses an archive whose members add up to more bytes than this
#: (counted while writing, never trusted from headers): a guard against archive bombs.
DEFAULT_UNPACK_MAX_BYTES = 16 << 30
#: ``Response.unpack()`` refuses an archive with more members than this.
DEFAULT_UNPACK_MAX_MEMBERS = 100_000
#: Folders beside the cache file: materialised files (``as_file``) and unpacked archives.
FILES_DIR_SUFFIX = ".files"
UNPACKED_DIR_SUFFIX = ".unpacked"
#: A temporary file or folder beside the cache older than this is a leftover of a dead
#: process, removed by ``gc()``.
STALE_TEMP_SEC = 3600.0
#: Longest symbolic link target read from a zip member.
MAX_LINK_TARGET_BYTES = 4096
#: Longest duration, in seconds, accepted anywhere (strategy intervals, leases,
#: pin_for): about 100 years, so every end time stays far inside what datetimes
#: (year 9999) and the file can hold.
MAX_DURATION_SEC = 100 * 365.25 * 86400
#: Longest network timeout, backoff cap and download lease, in seconds (one day).
MAX_NETWORK_WAIT_SEC = 86400.0
#: Most retries after the first attempt of a download.
MAX_RETRIES = 100
#: Most versions the garbage collector can be told to keep per request.
MAX_KEPT_VERSIONS = 1_000_000
#: Longest file name, in bytes of UTF-8, that the sanitiser returns (common file system limit).
MAX_FILENAME_BYTES = 255
#: Latest moment a stored time may name (a datetime ends at year 9999).
_MAX_TIMESTAMP = dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc).timestamp()
#: What a masked secret looks like in messages, logs, reprs and command-line output.
MASK = "***"
#: Format version written into lockfiles (``"buffylite_lockfile": 1``); see ``Cache.lock``.
LOCKFILE_FORMAT_VERSION = 1

_SQLITE_MAGIC = b"SQLite format 3\x00"
#: SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13
#: The process's umask, read once at import (reading it means setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class BuffyliteError(Exception):
    """Base class of every error buffylite raises on purpose."""


class FetchError(BuffyliteError):
    """A download failed and no cached version could be served instead.

    Attributes: ``url``; ``status_code`` (the origin's last HTTP status, or
    ``None`` when no response arrived); ``cause`` (the underlying exception or
    a short description).
    """

    def __init__(self, message: str, *, url: str, status_code: int | None = None,
                 cause: object = None):
        super().__init__(message)
        self.url = url
        self.status_code = status_code
        self.cause = cause

    def __reduce__(self):
        return (_rebuild_fetch_error, (self.args[0], self.url, self.status_code, str(self.cause)))


def _rebuild_fetch_error(message, url, status_code, cause):
    return FetchError(message, url=url, status_code=status_code, cause=cause)


class NotCachedError(BuffyliteError, LookupError):
    """No version matching the call is in the cache (and none may be downloaded)."""


class IntegrityError(BuffyliteError):
    """Content does not match the hash it was expected to have."""


class CacheFileError(BuffyliteError):
    """The cache file cannot be used: not a buffylite file, corrupt, or from a newer version.

    Attribute ``path``: the file concerned.
    """

    def __init__(self, message: str, *, path: str | os.PathLike):
        super().__init__(message)
        self.path = str(path)

    def __reduce__(self):
        return (_rebuild_cache_file_error, (self.args[0], self.path))


def _rebuild_cache_file_error(message, path):
    return CacheFileError(message, path=path)


class InvalidRequestError(BuffyliteError, ValueError):
    """An argument is invalid; nothing was written to the cache."""


class _DamagedValueError(CacheFileError):
    """A value read back from the cache file cannot be used (the disk damaged it): only
    what holds it is unusable."""


#: What reading a damaged stored value can raise (JSON and pydantic errors are
#: ValueErrors; a flipped type tag gives TypeErrors; huge numbers OverflowErrors).
_DAMAGE_ERRORS = (ValueError, TypeError, KeyError, OverflowError, AttributeError, IndexError)
_VERSION_PATTERN = re.compile(r"\d{20}")


# ---------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------


def _is_out_of_space(exc: BaseException | None) -> bool:
    """Does ``exc`` (or what caused it) say the disk or quota is full?"""
    for _ in range(8):  # a short cause chain; bounded in case of a cycle
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_FULL:
            return True
        if "disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _now() -> float:
    """Current time as a Unix timestamp (the unit of every stored time)."""
    return time.time()


def _to_datetime(timestamp: float | None) -> dt.datetime | None:
    """Unix timestamp -> aware UTC datetime (``None`` stays ``None``)."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


def _format_version(moment: dt.datetime) -> str:
    """Aware UTC datetime -> the 20-digit version string ``YYYYMMDDhhmmssffffff``."""
    return moment.strftime("%Y%m%d%H%M%S%f")


def _next_version_string(timestamp: float, newest_existing: str | None) -> str:
    """A version string for ``timestamp``, bumped by 1 µs steps past ``newest_existing``."""
    moment = _to_datetime(timestamp)
    candidate = _format_version(moment)
    if newest_existing is not None and candidate <= newest_existing:
        parsed = dt.datetime.strptime(newest_existing, "%Y%m%d%H%M%S%f")
        candidate = _format_version(parsed + dt.timedelta(microseconds=1))
    return candidate


def _is_offline_from_env() -> bool:
    """True when ``$BUFFYLITE_OFFLINE`` says offline."""
    return os.environ.get("BUFFYLITE_OFFLINE", "").strip().lower() in OFFLINE_ENV_VALUES


def _default_cache_path() -> pathlib.Path:
    """``$BUFFYLITE_CACHE``, else the platform's user cache directory / buffylite / cache.sqlite3."""
    override = os.environ.get("BUFFYLITE_CACHE")
    if override:
        return pathlib.Path(override).expanduser()
    return _user_cache_dir() / "cache.sqlite3"


def _user_cache_dir() -> pathlib.Path:
    """The platform's user cache directory / buffylite."""
    home = pathlib.Path.home()
    if sys.platform == "win32":
        base = pathlib.Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        base = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    return base / "buffylite"


#: ``scheme://`` at the start of a cache location: a URL, not a file path.
_URL_LOCATION = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _masked_location(location: str) -> str:
    """A URL with its password (if any) replaced by ``***``, fit for messages."""
    scheme, rest = location.split("://", 1)
    # Hosts never hold "@", passwords may hold "@" and "/": the user info ends at the last "@".
    head, question, query = rest.partition("?")
    userinfo, at, after = head.rpartition("@")
    if at and ":" in userinfo:
        head = f"{userinfo.split(':', 1)[0]}:***@{after}"
    return f"{scheme}://{head}{question}{query}"


def _refuse_url_location(location: str) -> None:
    """A cache location that is a URL must not become a local file named after it
    (with its password in the name): a PostgreSQL URL names a database, any other
    scheme is a mistake (InvalidRequestError)."""
    match = _URL_LOCATION.match(location)
    if match is None:
        return
    shown = _masked_location(location)
    if match.group(1).lower() in _POSTGRES_SCHEMES:
        return
    raise InvalidRequestError(f"The cache location {shown} is a URL with the scheme {match.group(1)!r}; "
                              "give the path of a cache file.")


def _check_path(name: str, value) -> pathlib.Path:
    """``value`` as a Path, or InvalidRequestError when it cannot be one (not a str or
    os.PathLike, or holding a NUL character) -- before anything is read or written."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidRequestError(f"{name} must be a path (str or os.PathLike), not {type(value).__name__}.")
    text = os.fspath(value)
    if not isinstance(text, str) or "\x00" in text:
        raise InvalidRequestError(f"{name} must be a text path without NUL characters, not {text!r}.")
    return pathlib.Path(text)


def _check_hash_type(name: str) -> str:
    """Return ``name`` lower-cased if hashlib knows it, else raise InvalidRequestError."""
    if not isinstance(name, str):
        raise InvalidRequestError(f"A hash type must be a str such as 'sha256', not {type(name).__name__}.")
    normalized = name.lower()
    if normalized not in hashlib.algorithms_available:
        raise InvalidRequestError(
            f"Unknown hash type {name!r}; use a hashlib algorithm such as 'sha256'.")
    if normalized.startswith("shake_"):
        raise InvalidRequestError(f"Hash type {name!r} has no fixed digest size; use e.g. 'sha256'.")
    return normalized


def _parse_expected_hash(value: str) -> tuple[str | None, str]:
    """``"sha256:<hex>"`` or ``"<hex>"`` -> (algorithm or None, lower-case hex)."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"expected_hash must be a str, not {type(value).__name__}.")
    algorithm, sep, digest = value.strip().rpartition(":")
    digest = digest.lower()
    if not digest or any(char not in "0123456789abcdef" for char in digest):
        raise InvalidRequestError(
            f"expected_hash {value!r} is not '<algorithm>:<hex digest>' or '<hex digest>'.")
    return (_check_hash_type(algorithm) if sep else None), digest


def _check_seconds(name: str, value, *, maximum: float = MAX_DURATION_SEC,
                   allow_zero: bool = True) -> float:
    """Return ``value`` as float seconds if it is a finite number in ``[0, maximum]``
    (``(0, maximum]`` without ``allow_zero``), else raise InvalidRequestError.
    The one check for every duration a caller passes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number of seconds, not {value!r}.")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not (0.0 < seconds <= maximum or (allow_zero and seconds == 0.0)):
        low = "0 <=" if allow_zero else "0 <"
        raise InvalidRequestError(f"{name} must be a finite number of seconds with {low} {name} <= "
                                  f"{maximum:g}, not {value!r}.")
    return seconds


def _check_count(name: str, value, *, minimum: int, maximum: int) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else raise
    InvalidRequestError."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidRequestError(f"{name} must be an integer from {minimum} to {maximum}, not {value!r}.")
    return value


def _check_timeout(value) -> float | urllib3.Timeout:
    """A timeout in seconds (0 < t <= one day) or a urllib3.Timeout whose parts are in that range."""
    if isinstance(value, urllib3.Timeout):
        for part in ("_connect", "_read", "total"):
            given = getattr(value, part, None)
            if isinstance(given, (int, float)) and not isinstance(given, bool):
                _check_seconds(f"timeout.{part.lstrip('_')}", given, maximum=MAX_NETWORK_WAIT_SEC,
                               allow_zero=False)
        return value
    return _check_seconds("timeout", value, maximum=MAX_NETWORK_WAIT_SEC, allow_zero=False)


#: RFC 9110 ``token``: what a header name (and a method) may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A host name: dot-separated labels of letters, digits, ``-`` and ``_`` (seen in the wild).
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?", re.ASCII)


def _is_storable_text(value) -> bool:
    """True when ``value`` is a str that UTF-8 can encode (no lone surrogates) and holds
    no NUL character (a PostgreSQL text column cannot store one; a cache must be able to
    move between the two kinds of store)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_line_break_or_nul(text: str) -> bool:
    return "\r" in text or "\n" in text or "\x00" in text


@functools.lru_cache(maxsize=256)
def _is_valid_host(host: str) -> bool:
    """A host name (international names in their IDNA form) or an IP literal.
    Remembered: a program fetches from a few hosts, again and again."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # (an IPv6 zone id is allowed after %)
        return True
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return False
    return _HOSTNAME.fullmatch(ascii_host) is not None


def _check_url(url: str) -> str:
    """Return ``url`` if it is an absolute http(s) URL that can be sent, else raise
    InvalidRequestError (a valid host name or IP literal; no whitespace, NUL or
    control characters anywhere). Messages never show a password in the URL."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError(f"URL must be a non-empty string, not {type(url).__name__} "
                                  f"{_mask_url(url) if isinstance(url, str) else '(not shown)'}.")
    url = url.strip()
    if not url.isprintable():
        shown = _mask_url(url)
        raise InvalidRequestError(f"URL {shown!r} contains control or other unprintable characters "
                                  "(NUL, CR, LF, tabs...).")
    try:
        parsed = urllib.parse.urlsplit(url)
        host = parsed.hostname
        parsed.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        shown = _mask_url(url)
        raise InvalidRequestError(f"URL {shown!r} cannot be parsed: {_mask_url(str(exc))}.") from None
    if parsed.scheme.lower() not in ("http", "https"):
        shown = _mask_url(url)
        raise InvalidRequestError(f"URL {shown!r} is not http or https; only those are fetched.")
    if not host:
        raise InvalidRequestError(f"URL {_mask_url(url)!r} has no host.")
    if not _is_valid_host(host):
        shown = _mask_url(url)
        raise InvalidRequestError(f"URL {shown!r} has an invalid host {host!r}: not a host name "
                                  "or an IP address.")
    return url


def _mask_url(url: str, sensitive_params: frozenset | set = frozenset()) -> str:
    """``url`` fit to show: the password (``user:***@host``) and the values of query
    parameters named in ``sensitive_params`` (lower-case) replaced by ``***``. Never raises."""
    if not isinstance(url, str):
        return repr(url)
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{hostport}" if has_password else f"{userinfo}@{hostport}"
        query = parts.query
        if query and sensitive_params:
            pairs = []
            for pair in query.split("&"):
                name, equals, value = pair.partition("=")
                if urllib.parse.unquote_plus(name).lower() in sensitive_params:
                    value = MASK
                pairs.append(f"{name}{equals}{value}")
            query = "&".join(pairs)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        # Unparsable: hide anything between "//" and "@" that could be a password.
        return re.sub(r"(//[^/@:]*:)[^/@]*@", rf"\g<1>{MASK}@", url)


def _split_credentials(url: str) -> tuple[str, str | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, ``"user:pw"``); other URLs unchanged."""
    if "@" not in url:  # no user information (the common case, without parsing again)
        return url, None
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    credentials = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), credentials


def _is_sendable_header_value(value: str) -> bool:
    """True when ``value`` can go on an HTTP header line: no NUL, CR or LF, Latin-1 only."""
    if _has_line_break_or_nul(value):
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _check_header(name, value) -> str:
    """Return ``name`` if ``name: value`` can be sent as an HTTP header, else raise
    InvalidRequestError: the name an RFC 9110 token, the value without NUL, CR or LF and
    Latin-1 only. The one check for request headers and the user agent."""
    if not isinstance(name, str) or not isinstance(value, str):
        raise InvalidRequestError(f"Header {name!r} must have a str name and a str value.")
    if not _TOKEN.fullmatch(name):
        raise InvalidRequestError(f"Header name {name!r} is not an HTTP token (letters, digits and "
                                  "!#$%&'*+-.^_`|~ only).")
    if _has_line_break_or_nul(value):
        raise InvalidRequestError(f"The value of header {name!r} contains a NUL, CR or LF.")
    if not _is_sendable_header_value(value):
        raise InvalidRequestError(f"The value of header {name!r} has characters HTTP headers cannot "
                                  "carry (only Latin-1).")
    return name


#: Characters no file name keeps: separators and what Windows forbids.
_FILENAME_FORBIDDEN = frozenset('/\\:*?"<>|')
#: Leading or trailing dots and white space, removed whole (so the result is a fixed point).
_FILENAME_EDGES = re.compile(r"^[\s.]+|[\s.]+$")
#: An extension is kept through a cut only when it is at most this many bytes.
_MAX_EXTENSION_BYTES = 32


def _replace_file(path: pathlib.Path, write: Callable[[Any], None], *,
                  keep_mode: int | None = None) -> pathlib.Path:
    """Fill a temporary file beside ``path`` with ``write(file)``, then rename it over
    ``path``: readers see the old file or the whole new one. The mode is the replaced
    file's (``keep_mode``), else what ``open()`` would give (mkstemp makes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".buffylite-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as output:
            write(output)
        os.chmod(temp_name, stat.S_IMODE(keep_mode) if keep_mode is not None else 0o666 & ~_UMASK)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    return path


def _write_to_callers_path(target, write: Callable[[Any], None]) -> None:
    """Write with ``write(file)`` to a path the caller named: through a symlink (its
    target is written), into a FIFO or a device as ``open(path, "wb")`` would; only a
    regular file (or nothing) is replaced, atomically, keeping its mode. A directory is
    an InvalidRequestError. (A name an origin chose is replaced instead: ``_replace_file``.)"""
    path = pathlib.Path(os.path.realpath(target))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise InvalidRequestError(f"Cannot write {target}: it is a directory.")
    if mode is not None and not stat.S_ISREG(mode):
        with open(path, "wb") as output:
            write(output)
        return
    _replace_file(path, write, keep_mode=mode)


def _cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 form has at most ``limit`` bytes."""
    return text.encode("utf-8")[:max(limit, 0)].decode("utf-8", "ignore")


def _sanitize_filename(name: str | None) -> str | None:
    """A bare file name safe to create inside a directory, or None when nothing usable is left.

    Keeps the last path component (either slash); drops control, format and other
    unprintable characters and those Windows forbids; removes leading and trailing
    dots and white space (so never ``.``, ``..`` or a hidden name); cuts to 255 bytes
    of UTF-8 at a character boundary, keeping a short extension. Idempotent:
    ``_sanitize_filename(_sanitize_filename(x)) == _sanitize_filename(x)``.
    """
    if not isinstance(name, str) or not name:
        return None
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _FILENAME_EDGES.sub("", "".join(
        char for char in last if char.isprintable() and char not in _FILENAME_FORBIDDEN))
    if len(cleaned.encode("utf-8")) > MAX_FILENAME_BYTES:
        stem, dot, extension = cleaned.rpartition(".")
        extension = dot + extension
        if not stem or len(extension.encode("utf-8")) > _MAX_EXTENSION_BYTES:
            stem, extension = cleaned, ""
        stem = _FILENAME_EDGES.sub("", _cut_utf8(stem, MAX_FILENAME_BYTES - len(extension.encode("utf-8"))))
        cleaned = _FILENAME_EDGES.sub("", stem + extension) if stem else ""
    return cleaned or None


def _filename_from_content_disposition(value: str | None) -> str | None:
    """File name from a Content-Disposition header; ``filename*`` wins over ``filename``
    (RFC 6266). Whatever the origin sent, returns a str or None (never raises): an
    unknown or unusable charset falls back to Latin-1 (RFC 8187 allows only UTF-8 and
    ISO-8859-1), a header that cannot be parsed gives None."""
    if not value or not isinstance(value, str):
        return None
    plain = extended = None
    import email.message  # noqa: PLC0415 - only for odd headers; see the imports note
    try:
        message = email.message.Message()
        message["Content-Disposition"] = value
        params = message.get_params(header="content-disposition", failobj=[])[1:]
    except Exception:  # noqa: BLE001 - an origin's header must never break a download
        return None
    for key, param in params:
        if not isinstance(key, str) or key.lower() != "filename":
            continue
        if isinstance(param, tuple):  # filename*=charset'lang'value, RFC 2231/5987
            charset, _language, text = param
            # email has already percent-decoded the value, one character per byte.
            raw = (text or "").encode("raw-unicode-escape")
            charset = (charset or "").strip().lower()
            try:
                # Only real text encodings: "idna", "rot13" or "hex" are codecs, not charsets.
                codec = codecs.lookup(charset) if charset else None
                extended = raw.decode(codec.name if codec and codec._is_text_encoding else "utf-8")
            except (LookupError, UnicodeError):
                extended = raw.decode("latin-1")
        elif isinstance(param, str):
            plain = email.utils.collapse_rfc2231_value(param)
    return extended or plain or None


def _guess_filename(content_disposition: str | None, url: str, media_type: str | None) -> str | None:
    """Content-Disposition, else the last URL path segment, else ``download`` + the media type's extension."""
    name = _sanitize_filename(_filename_from_content_disposition(content_disposition))
    if name:
        return name
    try:
        path = urllib.parse.urlsplit(url).path
    except ValueError:
        path = ""
    name = _sanitize_filename(urllib.parse.unquote(path.rsplit("/", 1)[-1]))
    if name:
        return name
    import mimetypes  # noqa: PLC0415 - reads the system's type tables: only when needed
    try:
        extension = mimetypes.guess_extension(media_type) if media_type else None
    except Exception:  # noqa: BLE001 - any media type string an origin sends
        extension = None
    return _sanitize_filename(FALLBACK_FILENAME + extension) if extension else None


def _parse_http_date(value: str | None) -> float | None:
    """HTTP date header -> Unix timestamp, or None when absent, unparsable, or outside
    what a datetime can hold in UTC (years 1970 to 9999)."""
    if not value or not isinstance(value, str):
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        timestamp = moment.timestamp()
        _to_datetime(timestamp)  # must read back
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return timestamp if 0 <= timestamp < _MAX_TIMESTAMP else None


#: RFC 9111 section 1.2.2: delta-seconds beyond what a cache can count are this many.
_DELTA_SECONDS_CAP = 2147483648
#: One Cache-Control directive: a token, optionally ``=`` a token or a quoted string.
_CACHE_DIRECTIVE = re.compile(r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?""")


def _caching_headers(headers) -> dict:
    """The response headers that decide freshness (CACHING_HEADERS), lower-case names;
    repeated fields arrive joined with ", " (urllib3), as RFC 9110 combines them."""
    found = {}
    for name in CACHING_HEADERS:
        value = headers.get(name)
        if value is not None:
            found[name] = str(value)
    return found


def _delta_seconds(text: str | None) -> int | None:
    """RFC 9111 delta-seconds (digits, perhaps quoted) -> int capped at 2**31, or None."""
    text = (text or "").strip().strip('"').strip()
    if not (text.isascii() and text.isdigit()):
        return None
    return _DELTA_SECONDS_CAP if len(text) > 10 else min(int(text), _DELTA_SECONDS_CAP)


def _http_freshness(headers: dict, now: float, response_time: float | None = None) -> float | None:
    """Seconds of freshness left for a stored response, as RFC 9111 section 4.2 computes it:
    positive while fresh, zero or negative once stale; None when the headers say nothing
    about freshness (the caller falls back to a heuristic).

    ``headers``: the response's caching headers (lower-case names: ``cache-control``,
    ``expires``, ``date``, ``age``); ``response_time``: when it was received (or last
    confirmed by a 304), default ``now``. ``no-cache`` and ``no-store`` leave no freshness
    (revalidate every time); ``s-maxage`` is for shared caches and ignored. Freshness
    lifetime: ``max-age``, else ``Expires - Date``; an invalid ``max-age`` or ``Expires``
    means already stale (RFC 9111 section 4.2.1). Age: ``current_age = max(apparent_age, Age) +
    resident_time`` with ``apparent_age = max(0, response_time - Date)`` (the response
    delay is not recorded, so it counts as 0). Never raises, whatever the header text.
    """
    response_time = now if response_time is None else response_time
    directives: dict[str, str | None] = {}
    for match in _CACHE_DIRECTIVE.finditer(headers.get("cache-control") or ""):
        directives.setdefault(match[1].lower(), match[2])  # the first occurrence counts
    if "no-cache" in directives or "no-store" in directives:
        return 0.0
    date_value = _parse_http_date(headers.get("date"))
    if date_value is None:
        date_value = response_time  # RFC 9110 section 6.6.1: no Date -> the time of receipt
    if "max-age" in directives:
        lifetime = _delta_seconds(directives["max-age"])
        if lifetime is None:
            return 0.0
    elif headers.get("expires") is not None:
        expires = _parse_http_date(headers.get("expires"))
        if expires is None:
            return 0.0  # "Expires: 0" and other invalid dates mean already expired
        lifetime = max(0.0, expires - date_value)
    else:
        return None
    age_value = _delta_seconds(headers.get("age")) or 0
    apparent_age = max(0.0, response_time - date_value)
    current_age = max(apparent_age, age_value) + max(0.0, now - response_time)
    return lifetime - current_age


#: Made once: ``json.dumps`` with these options would build an encoder on every call
#: (a third of the cost of an identity's key). Encoding with it is thread-safe.
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def _canonical_json(value: Any) -> str:
    """Stable JSON text: sorted keys, no spaces; used for identities and stored dicts.
    InvalidRequestError for what a caller may pass but JSON cannot hold in a stable form:
    keys of mixed types (unsortable), nesting deeper than Python recursion, cycles."""
    try:
        return _CANONICAL_ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"A body or params value cannot be written as JSON: {exc}.") from None


def _encode_body(body: dict | list | bytes | str | None) -> tuple[str | None, bytes | None]:
    """fetch(body=...) -> (kind, bytes sent). Kinds: ``json``, ``text``, ``bytes``."""
    if body is None:
        return None, None
    if isinstance(body, (bytes, bytearray, memoryview)):
        return "bytes", bytes(body)
    if isinstance(body, str):
        try:
            return "text", body.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError("body is not valid Unicode text (it has a lone surrogate).") from None
    if isinstance(body, (dict, list)):
        return "json", _canonical_json(body).encode("utf-8")
    raise InvalidRequestError(f"body must be a dict (sent as JSON), bytes or str, not {type(body).__name__}.")


def _decode_body(kind: str | None, raw: bytes | None) -> Any:
    """Inverse of ``_encode_body`` for the stored request body."""
    if kind is None or raw is None:
        return None
    if kind == "json":
        return json.loads(raw)
    if kind == "text":
        return raw.decode("utf-8")
    return bytes(raw)


#: Text codecs Python knows that are no charset a document can be in.
_NOT_CHARSETS = frozenset({"idna", "punycode", "raw-unicode-escape", "unicode-escape", "mbcs", "oem"})


def _charset_of(media_type_header: str | None) -> str | None:
    """The ``charset`` parameter of a Content-Type header, if any."""
    if not media_type_header:
        return None
    import email.message  # noqa: PLC0415 - see the imports note
    try:
        message = email.message.Message()
        message["Content-Type"] = media_type_header
        charset = message.get_content_charset()
        # An origin may name a codec that is no charset ("rot13", "idna"): ignore it.
        codec = codecs.lookup(charset) if charset else None
        return charset if codec and codec._is_text_encoding and codec.name not in _NOT_CHARSETS else None
    except Exception:  # noqa: BLE001 - any Content-Type an origin sends
        return None


# ---------------------------------------------------------------------------
# Data model (pydantic), with Buffy's names
# ---------------------------------------------------------------------------

Tag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{2,64}$")]


@functools.cache
def _tag_adapter() -> pydantic.TypeAdapter:
    """The validator of a tag, built on first use: a tag is checked only when a call names
    one (``tag()``, ``untag()``, ``lock(tag=)``, ``force_tag=``...), never by a plain fetch."""
    return pydantic.TypeAdapter(Tag)


class _ModelMetaclass(type(BaseModel)):
    """pydantic's model metaclass with a short ``dir()`` of the class: only what buffylite
    defines. ``help()`` then shows a model's own methods instead of several hundred lines
    of pydantic's per model (``model_dump`` and the rest still work, and are listed by
    ``dir()`` of an instance as usual)."""

    def __dir__(cls) -> list[str]:
        names = set()
        for klass in cls.__mro__:
            if klass is BaseModel:
                break
            names.update(name for name in vars(klass) if not name.startswith("__")
                         and name not in ("model_config", "model_post_init"))
        return sorted(names)


class _Model(BaseModel, metaclass=_ModelMetaclass):
    """Base of the public models: unknown fields are an error, not silently kept.

    A model's validator is built when first used, not at import: most programs use a
    few of them (an import that builds them all costs several milliseconds more)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


class _Strategy(_Model):
    """Base of the strategy models; ``strategy_name`` discriminates them. Built at import:
    every fetch reads a stored configuration, the first one too."""

    model_config = ConfigDict(extra="forbid", defer_build=False)

    strategy_name: str


#: A duration field of a model: finite, 0 to MAX_DURATION_SEC seconds.
Seconds = Annotated[float, Field(ge=0, le=MAX_DURATION_SEC, allow_inf_nan=False)]


def _validation_message(error: pydantic.ValidationError) -> str:
    """A pydantic error as one sentence naming each field at fault."""
    return "; ".join(f"{'.'.join(map(str, item['loc'])) or 'value'}: {item['msg']}"
                     for item in error.errors(include_url=False)) + "."


def _build_model(model: type, **fields):
    """``model(**fields)``, with a rejected value raised as InvalidRequestError."""
    try:
        return model(**fields)
    except pydantic.ValidationError as exc:
        raise InvalidRequestError(f"Invalid {model.__name__}: {_validation_message(exc)}") from None


class ReCachingStrategy:
    """When ``fetch`` downloads again instead of serving the newest cached version.

    Build one with the constructors, as in Buffy::

        ReCachingStrategy.never()
        ReCachingStrategy.age(seconds=3600)
        ReCachingStrategy.when_requested()
        ReCachingStrategy.when_remote_changed(check_interval_sec=21600, fallback_max_age_sec=86400)
        ReCachingStrategy.cron(cron="0 0 * * *", run_at_start=True)   # needs buffylite[cron]
        ReCachingStrategy.http(fallback_max_age_sec=86400)            # the origin's Cache-Control

    Each returns a pydantic model whose ``strategy_name`` discriminates it; a
    ``RequestCacheConfiguration`` also accepts the equivalent dict.
    """

    @staticmethod
    def never() -> "NeverStrategy":
        """Download once; serve the cached version forever after."""
        return _build_model(NeverStrategy)

    @staticmethod
    def age(seconds: float = 3600) -> "AgeStrategy":
        """Download again when the newest version was last validated more than ``seconds`` ago."""
        return _build_model(AgeStrategy, seconds=seconds)

    @staticmethod
    def when_requested() -> "WhenRequestedStrategy":
        """Download on every fetch; serve the cached version if that fails."""
        return _build_model(WhenRequestedStrategy)

    @staticmethod
    def when_remote_changed(check_interval_sec: float = 21600,
                            fallback_max_age_sec: float = 86400) -> "WhenRemoteChangedStrategy":
        """Ask the origin (conditional GET) at most every ``check_interval_sec``; without
        ETag/Last-Modified behave as ``age(fallback_max_age_sec)``."""
        return _build_model(WhenRemoteChangedStrategy, check_interval_sec=check_interval_sec,
                            fallback_max_age_sec=fallback_max_age_sec)

    @staticmethod
    def cron(cron: str = "0 0 * * *", run_at_start: bool = True) -> "CronStrategy":
        """Download when a tick of the cron expression passed since the last validation;
        with ``run_at_start`` also once per opened Cache. Needs ``buffylite[cron]``."""
        return _build_model(CronStrategy, cron=cron, run_at_start=run_at_start)

    @staticmethod
    def http(fallback_max_age_sec: float = 86400) -> "HttpStrategy":
        """Follow the origin's caching headers as RFC 9111 computes freshness
        (``Cache-Control: max-age``, ``no-cache``/``no-store``, ``Expires`` with ``Date``,
        ``Age``); revalidate with a conditional GET once stale. A version whose response
        said nothing about freshness is fresh for ``fallback_max_age_sec`` after its last
        validation. Every download is stored, whatever ``no-store`` says: this is a
        versioning cache."""
        return HttpStrategy(fallback_max_age_sec=fallback_max_age_sec)


class NeverStrategy(_Strategy):
    """Serve the cached version forever."""

    strategy_name: Literal["never"] = "never"


class AgeStrategy(_Strategy):
    """Download again once the newest version is older than ``seconds``."""

    strategy_name: Literal["age"] = "age"
    seconds: Seconds = 3600


class WhenRequestedStrategy(_Strategy):
    """Download on every fetch (stale-if-error)."""

    strategy_name: Literal["when_requested"] = "when_requested"


class WhenRemoteChangedStrategy(_Strategy):
    """Conditional GET at most every ``check_interval_sec``."""

    strategy_name: Literal["when_remote_changed"] = "when_remote_changed"
    check_interval_sec: Seconds = 21600
    fallback_max_age_sec: Seconds = 86400


class CronStrategy(_Strategy):
    """Download on the ticks of a cron expression (needs ``buffylite[cron]``)."""

    strategy_name: Literal["cron"] = "cron"
    cron: str = Field("0 0 * * *", max_length=1000)
    run_at_start: bool = True

    @pydantic.field_validator("cron")
    @classmethod
    def _check_expression(cls, value: str) -> str:
        _croniter = _optional_extra("croniter")
        if _croniter is None:
            return value
        try:
            valid = _croniter.croniter.is_valid(value)
        except Exception:  # noqa: BLE001 - any input croniter chokes on is not a cron line
            valid = False
        if not valid:
            raise ValueError(f"{value!r} is not a valid cron expression")
        # An expression may be valid and still never fire ("0 0 30 2 *"): such a
        # strategy would fail on every later fetch, so it is refused now.
        try:
            tick = _croniter.croniter(value, dt.datetime.now(dt.timezone.utc)).get_next(float)
            _to_datetime(tick)
        except Exception:  # noqa: BLE001 - croniter's "no next date" errors vary by version
            raise ValueError(f"cron expression {value!r} never fires") from None
        return value


class HttpStrategy(_Strategy):
    """Freshness from the origin's Cache-Control / Expires / Date / Age (RFC 9111)."""

    strategy_name: Literal["http"] = "http"
    fallback_max_age_sec: float = Field(86400, ge=0, le=MAX_FRESHNESS_SEC, allow_inf_nan=False)


AnyStrategy = Annotated[
    Union[NeverStrategy, AgeStrategy, WhenRequestedStrategy, WhenRemoteChangedStrategy, CronStrategy,
          HttpStrategy],
    Field(discriminator="strategy_name"),
]


class RequestCacheConfiguration(_Model):
    """How a request is cached: the re-caching strategy and how many versions the GC keeps."""

    model_config = ConfigDict(extra="forbid", defer_build=False)  # (see _Strategy)

    recaching_strategy: AnyStrategy = Field(default_factory=WhenRemoteChangedStrategy)
    max_cached_unpinned_versions: int = Field(2, ge=1, le=MAX_KEPT_VERSIONS, strict=True)
    max_cached_pinned_versions: int = Field(10, ge=0, le=MAX_KEPT_VERSIONS, strict=True)


class Request(_Model):
    """A stored request: what ``fetch`` asks the origin for (Buffy's field names)."""

    id: int
    url: str
    http_method: str = "get"
    http_header_fields: dict[str, str] = Field(default_factory=dict)
    http_query_params: Optional[dict[str, Any]] = None
    http_request_body: Any = None
    group_name: str = DEFAULT_GROUP
    description: Optional[str] = None
    documentation_link: Optional[str] = None
    validation_hash_type: str = DEFAULT_HASH_TYPE
    cache_configuration: RequestCacheConfiguration = Field(default_factory=RequestCacheConfiguration)

    @pydantic.field_validator("validation_hash_type")
    @classmethod
    def _known_hash_type(cls, value: str) -> str:
        try:
            return _check_hash_type(value)
        except InvalidRequestError as exc:
            raise ValueError(str(exc)) from None

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, url={self.url!r}, method={self.http_method!r}, group={self.group_name!r})"


class ResponseContentAttributes(_Model):
    """What the origin's headers said about the content."""

    model_config = ConfigDict(extra="forbid", defer_build=False)  # read on every cache hit

    media_type: Optional[str] = None
    etag: Optional[str] = None
    content_size_bytes: Optional[int] = Field(None, ge=0)
    last_modified_datetime_utc: Optional[dt.datetime] = None
    filename: Optional[str] = None
    content_disposition: Optional[str] = None


class ResponseDownloadStats(_Model):
    """How the download of a version went."""

    model_config = ConfigDict(extra="forbid", defer_build=False)  # read on every cache hit

    downloaded_bytes: int = Field(0, ge=0)
    avg_bytes_per_sec: float = Field(0.0, ge=0)
    download_running_duration_sec: float = Field(0.0, ge=0)
    download_start_time_unix_ts: Optional[float] = None
    total_bytes_to_download: Optional[int] = Field(None, ge=0)
    state: Optional[str] = None
    error: Optional[str] = None


class Response(_Model):
    """One version of a request's content, as stored.

    The content itself stays in the cache file: ``read()``, ``open()``, ``text()``,
    ``json()`` and ``save_to()`` fetch it through the ``Cache`` that produced this
    object. ``outcome`` (not stored) says how this object came back from the call
    that returned it: ``downloaded``, ``not_modified``, ``duplicate``, ``stale``,
    ``offline`` or ``cached``. ``stale_reason`` (not stored either) says why, when
    ``outcome`` is ``stale``: the failure of the download just attempted, or, during
    the failure backoff, the earlier failure that keeps fetch from trying now.
    """

    id: int
    request_id: int
    url: str
    version: str = Field(pattern=r"^\d{20}$")
    previous_version: Optional[str] = None
    next_version: Optional[str] = None
    status: Literal["wait", "in_progress", "ready", "duplicate", "failed"]
    cached_datetime_utc: Optional[dt.datetime] = None
    validated_datetime_utc: Optional[dt.datetime] = None
    request_datetime_utc: Optional[dt.datetime] = None
    pinned: bool = False
    pinned_until_utc: Optional[dt.datetime] = None
    tags: list[Tag] = Field(default_factory=list)
    content_hash_hex: Optional[str] = None
    content_attributes: ResponseContentAttributes = Field(default_factory=ResponseContentAttributes)
    download_stats: ResponseDownloadStats = Field(default_factory=ResponseDownloadStats)
    outcome: Optional[Literal["downloaded", "not_modified", "duplicate", "stale", "offline", "cached"]] = None
    stale_reason: Optional[str] = None

    _cache: Any = PrivateAttr(default=None)
    _content_id: Optional[int] = PrivateAttr(default=None)
    _expected_hash: Optional[str] = PrivateAttr(default=None)  # set by fetch(expected_hash=...)

    @property
    def is_pinned(self) -> bool:
        """True when permanently pinned or while a lease runs."""
        if self.pinned or self.pinned_until_utc is None:
            return self.pinned
        cache = self.__pydantic_private__.get("_cache")
        now = cache._store.now() if cache is not None else _now()  # the store's clock orders leases
        return self.pinned_until_utc.timestamp() > now

    def _require_content(self) -> tuple["Cache", int]:
        private = self.__pydantic_private__
        if private["_cache"] is None or private["_content_id"] is None:
            raise NotCachedError(f"Version {self.version} of {self.url} has no stored content "
                                 f"(status {self.status}).")
        return private["_cache"], private["_content_id"]

    def read(self) -> bytes:
        """The whole content as bytes (for large content prefer ``open()``).

        Raises IntegrityError when the stored chunks do not add up to the stored size, or,
        for a Response from ``fetch(expected_hash=...)``, when the bytes do not hash to it
        (the version is then marked corrupted); NotCachedError when the version is gone.
        """
        cache, content_id = self._require_content()
        data, hash_type, _ = cache._store.read_content(content_id)
        expected = self.__pydantic_private__.get("_expected_hash")
        if expected is not None:
            digest = hashlib.new(hash_type, data).hexdigest()
            if digest != expected:
                marked = "It is now marked failed."
                if cache._store.read_only:  # the damage is reported all the same
                    marked = "The cache is read-only: it cannot be marked failed."
                else:
                    cache._store.mark_content_corrupted(content_id, expected)
                raise IntegrityError(f"Version {self.version} of {self.url} is corrupted in {cache.path}: "
                                     f"its bytes hash to {digest}, not {expected}. {marked}")
        return data

    def open(self) -> "_ContentStream":
        """A seekable binary file-like object streaming the content in bounded memory.

        ``seek``/``tell`` work as on a file (``zipfile.ZipFile(resp.open())`` and
        ``tarfile.open(fileobj=resp.open())`` read members straight from the cache); at
        most one stored chunk is held in memory. Use it as a context manager. It reads from
        a snapshot: it stays readable until closed even if another thread or process
        deletes this version meanwhile. Raises IntegrityError when the stored chunks do
        not add up to the stored size; for a Response from ``fetch(expected_hash=...)``,
        the read that reaches the end raises IntegrityError instead of returning bytes
        that do not hash to it (when the content is read in order from the start).
        """
        cache, content_id = self._require_content()
        return cache._store.open_content(content_id,
                                         check_hash=self.__pydantic_private__.get("_expected_hash"))

    def as_file(self) -> pathlib.Path:
        """The path of a read-only regular file holding the content, for tools that need a path.

        Written once per content into ``<cache file>.files/<hash type>-<hash>/``, named
        with the version's (sanitised) file name, atomically, with the hash checked on the
        way; later calls, from any thread or process, return the same file without
        rewriting it. ``Cache.gc()`` removes it once no version references the content.
        The file is shared: do not change its mode or contents.
        Raises IntegrityError when the stored content is damaged, NotCachedError when the
        version is gone, CacheFileError on a read-only cache when the file is not there
        yet (a read-only cache writes nothing; ``save_to`` writes where you choose).
        """
        cache, content_id = self._require_content()
        return _materialise(cache, content_id, self)

    def unpack(self, dir: str | os.PathLike | None = None, *,  # noqa: A002 - the documented name
               max_bytes: int = DEFAULT_UNPACK_MAX_BYTES,
               max_members: int = DEFAULT_UNPACK_MAX_MEMBERS) -> pathlib.Path:
        """Unpack a zip, tar (plain, gz, bz2, xz) or single-file gz/bz2/xz content; return the folder.

        ``dir`` None: a folder beside the cache (``<cache file>.unpacked/<hash type>-<hash>``),
        made once per content and reused by later calls (``Cache.gc()`` removes it with the
        content; a read-only cache cannot make it: CacheFileError). ``dir`` given: the archive is unpacked into a temporary folder next to it,
        which is renamed to ``dir``; when ``dir`` already exists, the archive is merged
        into it without deleting or overwriting anything: an entry already there with
        other content, or a hidden top-level name in the archive, is InvalidRequestError
        and nothing is written (an equal file is left as it is). A single compressed file is
        named after the version's file name without its compression suffix.

        Entries with absolute paths or ``..``, links leading out of the folder, device
        files and FIFOs are refused with IntegrityError, and nothing is written outside
        the folder. ``max_bytes`` (unpacked bytes, counted as they are written) and
        ``max_members`` guard against archive bombs: reaching either raises IntegrityError
        and leaves nothing behind. InvalidRequestError when the content is not one of the
        supported formats.
        """
        cache, content_id = self._require_content()
        for name, value in (("max_bytes", max_bytes), ("max_members", max_members)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, not {value!r}.")
        folder = None if dir is None else _check_path("dir", dir)
        if self.__pydantic_private__.get("_expected_hash") is not None:
            # Unpacking seeks around the content, so its bytes are checked in one pass first.
            with self.open() as stream:
                while stream.read(DEFAULT_CHUNK_SIZE_BYTES):
                    pass
        return _unpack(cache, content_id, self, folder,
                       _UnpackLimits(max_bytes, max_members))

    def text(self, encoding: str | None = None) -> str:
        """The content decoded with ``encoding``, else the Content-Type charset, else UTF-8."""
        charset = encoding or _charset_of(self.content_attributes.media_type) or "utf-8"
        return self.read().decode(charset)

    def json(self) -> Any:
        """The content parsed as JSON."""
        return json.loads(self.read())

    def save_to(self, target: str | os.PathLike | io.IOBase | None = None, *,
                dir: str | os.PathLike | None = None) -> pathlib.Path | None:  # noqa: A002 - the public name
        """Write the content to a path, a writable binary file, or a directory.

        ``target`` a path: a regular file (or nothing) there is replaced atomically
        (temporary file + rename in the same directory; a replaced file keeps its
        mode); a symlink is written through (its target is replaced); a FIFO or a
        device is written into as ``open(path, "wb")`` would. The path is returned.
        ``target`` a file object: the bytes are written to it, ``None`` is returned.
        ``dir``: the file is named from ``content_attributes.filename``, sanitised so it
        can never leave ``dir`` nor be hidden (fallback ``download``); whatever is at
        that name (a symlink, FIFO or device too) is replaced, never followed.
        Raises InvalidRequestError when neither or both of ``target``/``dir`` are given,
        a path is not a usable path, ``target`` is a directory, ``dir`` is not one, or a
        file object refuses the bytes; CacheFileError (naming the path) when the file
        system refuses the write.
        """
        if (target is None) == (dir is None):
            raise InvalidRequestError("save_to() needs exactly one of target or dir=.")
        cache, content_id = self._require_content()
        if hasattr(target, "write"):
            try:
                self._copy_content_to(cache, content_id, target, self.__pydantic_private__.get("_expected_hash"))
            except (OSError, ValueError) as exc:  # io.UnsupportedOperation is both
                if isinstance(exc, BuffyliteError):
                    raise
                raise InvalidRequestError(f"Cannot write the content of {self.url} to {target!r}: {exc}.") from exc
            return None
        if dir is not None:
            directory = _check_path("dir", dir)
            if os.path.exists(directory) and not os.path.isdir(directory):
                raise InvalidRequestError(f"Cannot save the content of {self.url} into {dir}: it is not a "
                                          "directory.")
        elif not isinstance(target, (str, os.PathLike)):
            raise InvalidRequestError(f"target must be a path or a writable binary file, not "
                                      f"{type(target).__name__}.")
        else:
            _check_path("target", target)
        try:
            return self._save_to_path(cache, content_id, target, dir)
        except OSError as exc:
            where = target if target is not None else dir
            raise CacheFileError(f"Cannot save the content of {self.url} to {where}: {exc}.", path=where) from exc

    def _save_to_path(self, cache, content_id: int, target, dir) -> pathlib.Path:  # noqa: A002
        """``save_to`` with a checked path ``target`` or directory ``dir``."""
        if dir is not None:
            directory = pathlib.Path(dir)
            directory.mkdir(parents=True, exist_ok=True)
            # The origin chose this name: whatever is there (a symlink, a FIFO, a device)
            # is replaced by the rename, never followed or written into.
            name = _sanitize_filename(self.content_attributes.filename) or FALLBACK_FILENAME
            return _replace_file(directory / name, self._content_writer(cache, content_id))
        _write_to_callers_path(target, self._content_writer(cache, content_id))
        return pathlib.Path(target)

    def _content_writer(self, cache, content_id: int) -> Callable[[Any], None]:
        """``write(file)``: copies this version's content into a file (hash-checked when
        this Response came from ``fetch(expected_hash=...)``)."""
        expected = self.__pydantic_private__.get("_expected_hash")
        return lambda output: self._copy_content_to(cache, content_id, output, expected)

    @staticmethod
    def _copy_content_to(cache, content_id: int, output, check_hash: str | None = None) -> None:
        # With check_hash (a Response from fetch(expected_hash=...)), the read reaching
        # the end raises IntegrityError instead of handing out bytes that do not match.
        with cache._store.open_content(content_id, check_hash=check_hash) as stream:
            for piece in iter(lambda: stream.read(DEFAULT_CHUNK_SIZE_BYTES), b""):
                output.write(piece)

    # --- asyncio (see AsyncCache) ---

    async def aread(self) -> bytes:
        """``read()`` in a worker thread: the whole content, without blocking the event loop."""
        cache, _ = self._require_content()
        return await _run_blocking(getattr(cache, "_async_executor", None), self.read)

    def aopen(self) -> "_AsyncContentStream":
        """``open()`` for asyncio: ``async with resp.aopen() as stream: await stream.read(n)``.

        The stream reads in a thread of its own, so the event loop never waits for SQLite.
        """
        self._require_content()
        return _AsyncContentStream(self)

    # --- short repr, pickling ---

    def __repr__(self) -> str:
        size = self.content_attributes.content_size_bytes
        return (f"Response(url={self.url!r}, version={self.version!r}, status={self.status!r}, "
                f"size={size!r})")

    def __reduce__(self):
        # The bound Cache (connections, thread-locals, an HTTP pool) cannot travel to
        # another process; its path can. The copy binds to one Cache per path there.
        cache = self.__pydantic_private__.get("_cache")
        path = _portable_cache_path(cache._location) if cache is not None else None
        # The expected hash travels too: the copy must check it as the original does.
        return (_unpickle_response, (path, dict(self.__dict__), self.__pydantic_private__.get("_content_id"),
                                     self.__pydantic_private__.get("_expected_hash")))


_RESPONSE_FIELD_NAMES = frozenset(Response.model_fields)

#: Caches opened to rebind unpickled Responses: one per path per process.
_REBOUND_CACHES: dict[str, "Cache"] = {}
_REBOUND_CACHES_LOCK = threading.Lock()


def _portable_cache_path(path) -> str:
    """The cache path as another process must see it: absolute (URLs stay as they are)."""
    text = str(path)
    return text if "://" in text else os.path.abspath(text)


def _unpickle_response(path: str | None, fields: dict, content_id: int | None,
                       expected_hash: str | None = None) -> Response:
    """Rebuild a pickled Response, bound to this process's Cache for ``path``.

    A missing cache file is not created: the Response then has no content to read.
    """
    cache = None
    if path is not None and ("://" in path or os.path.exists(path)):
        with _REBOUND_CACHES_LOCK:
            cache = _REBOUND_CACHES.get(path)
            if cache is None:
                cache = _REBOUND_CACHES[path] = Cache(path)
    private = {name: attribute.get_default() for name, attribute in Response.__private_attributes__.items()}
    private.update(_cache=cache, _content_id=content_id if cache is not None else None,
                   _expected_hash=expected_hash)
    fields = {**{name: info.get_default(call_default_factory=True) for name, info in Response.model_fields.items()
                 if name not in fields}, **fields}
    return _trusted_response(fields, private)


#: The columns of a version row that a Response shows.
_RESPONSE_SOURCE_COLUMNS = ("id", "request_id", "version", "status", "cached_unix", "validated_unix",
                            "request_unix", "pinned", "pinned_until_unix", "tags", "content_hash_hex",
                            "content_attributes", "download_stats")
_response_source_of = operator.attrgetter(*_RESPONSE_SOURCE_COLUMNS)


def _stored_response_fields(row) -> dict:
    """The Response fields a version row determines, converted from the stored values
    once per row object: the read memo hands the same row objects to every hit until the
    file changes. Kept with the values they came from (a transaction may update a row
    object it read); callers copy the mutable ones. A damaged value raises one of
    ``_DAMAGE_ERRORS``."""
    source = _response_source_of(row)
    converted = getattr(row, "_response_fields", None)
    if converted is not None and converted[0] == source:
        return converted[1]
    if row.status not in VERSION_STATUSES or not _VERSION_PATTERN.fullmatch(row.version):
        raise ValueError("bad status or version string")
    fields = {
        "id": row.id, "request_id": row.request_id, "version": row.version, "status": row.status,
        "cached_datetime_utc": _to_datetime(row.cached_unix),
        "validated_datetime_utc": _to_datetime(row.validated_unix),
        "request_datetime_utc": _to_datetime(row.request_unix),
        "pinned": bool(row.pinned), "pinned_until_utc": _to_datetime(row.pinned_until_unix),
        "tags": _row_tags(row), "content_hash_hex": row.content_hash_hex,
        "content_attributes": ResponseContentAttributes.model_validate_json(row.content_attributes or "{}"),
        "download_stats": ResponseDownloadStats.model_validate_json(row.download_stats or "{}"),
        "stale_reason": None}
    with contextlib.suppress(AttributeError):
        row._response_fields = (source, fields)
    return fields


def _copy_of(model: BaseModel) -> BaseModel:
    """A shallow copy of a flat model whose field values are immutable (what
    ``model_copy`` does, for a model without extra or private attributes, at half its cost)."""
    copy = model.__class__.__new__(model.__class__)
    object.__setattr__(copy, "__dict__", dict(model.__dict__))
    object.__setattr__(copy, "__pydantic_fields_set__", set(model.__pydantic_fields_set__))
    object.__setattr__(copy, "__pydantic_extra__", None)
    object.__setattr__(copy, "__pydantic_private__", None)
    return copy


def _trusted_response(fields: dict, private: dict) -> Response:
    """A Response from values read back from the cache file, which were validated on
    the way in. Does what ``Response.model_construct`` does (sets the instance's
    ``__dict__``, fields set, extra and private attributes) without its per-field
    default handling, which costs more than the rest of a cache hit; ``fields`` must
    name every field."""
    response = Response.__new__(Response)
    object.__setattr__(response, "__dict__", fields)
    object.__setattr__(response, "__pydantic_fields_set__", set(_RESPONSE_FIELD_NAMES))
    object.__setattr__(response, "__pydantic_extra__", None)
    object.__setattr__(response, "__pydantic_private__", private)
    return response


class GCReport(_Model):
    """What a garbage collection removed."""

    removed: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(GC_REASONS, 0))
    bytes_freed: int = 0
    file_size_before: int = 0
    file_size_after: int = 0


class VerifyReport(_Model):
    """Result of ``Cache.verify()``: contents re-hashed, versions whose content is
    corrupted (found now or by an earlier verify, until deleted or collected), and
    structural damage (``problems``: the database's own checks, unreadable rows)."""

    checked: int = 0
    corrupted: list[Response] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)

    @property
    def intact(self) -> bool:
        """True when nothing is corrupted and no problem was found."""
        return not self.corrupted and not self.problems


class RefreshResult(_Model):
    """What ``Cache.refresh()`` did for one stored request."""

    url: str
    group: str
    outcome: str
    version: Optional[str] = None
    error: Optional[str] = None


# ---------------------------------------------------------------------------
# Storage: schema, connections, transactions, chunk I/O
# ---------------------------------------------------------------------------
#
# Everything goes through peewee's portable query API. What only SQLite has
# (pragmas, auto_vacuum, application_id/user_version, the file header check,
# checkpoints) lives in the ``_sqlite_*`` functions right below the models, so a
# PostgreSQL backend replaces those and nothing above ``_Store``.


def _references(table: str, on_delete: str | None = None) -> list:
    """A column constraint pointing at ``table(id)``."""
    clause = f"REFERENCES {table}(id)" + (f" ON DELETE {on_delete}" if on_delete else "")
    return [peewee.SQL(clause)]


class _NeverReusedIdField(peewee.AutoField):
    """A primary key whose values are never handed out again after a delete.

    A Response keeps its version id and content id; were a deleted id reused, pinning
    or reading that Response would reach another version's row or bytes. In SQLite
    that takes AUTOINCREMENT (plain rowids reuse the highest freed value); identity
    columns of other databases never reuse values anyway.
    """

    def ddl(self, ctx):
        if not isinstance(self.model._meta.database, peewee.SqliteDatabase):
            return super().ddl(ctx)
        return peewee.NodeList((super().ddl(ctx), peewee.SQL("AUTOINCREMENT")))


class _Row(peewee.Model):
    """Base of the table models; bound to a database per Cache by ``_Tables``."""

    id = _NeverReusedIdField()

    class Meta:
        legacy_table_names = False


class _MetaRow(_Row):
    """Key/value facts about the file (the salt for sensitive headers, the creation time)."""

    key = peewee.CharField(primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "meta"


class _RequestRow(_Row):
    """One request identity (method, URL, params, headers, body, group) and its settings."""

    identity_key = peewee.CharField(unique=True)
    url = peewee.TextField()
    http_method = peewee.CharField()
    group_name = peewee.CharField(index=True)
    http_header_fields = peewee.TextField()          # JSON; sensitive values as digests
    http_query_params = peewee.TextField(null=True)  # JSON
    body_kind = peewee.CharField(null=True)          # json | text | bytes
    http_request_body = peewee.BlobField(null=True)
    description = peewee.TextField(null=True)
    documentation_link = peewee.TextField(null=True)
    validation_hash_type = peewee.CharField()
    cache_configuration = peewee.TextField()         # JSON of RequestCacheConfiguration
    created_unix = peewee.DoubleField()
    last_settlement = peewee.TextField(null=True)    # JSON: how the last download ended, for waiters
    backoff_until_unix = peewee.DoubleField(null=True)  # failure backoff: serve stale until then
    backoff_failure = peewee.TextField(null=True)       # JSON: the failure that started the backoff

    class Meta:
        table_name = "request"


class _ContentRow(_Row):
    """One distinct content. ``hash_hex`` is NULL while partial (or once found corrupted)."""

    hash_type = peewee.CharField()
    hash_hex = peewee.CharField(null=True)
    size_bytes = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "content"
        indexes = ((("hash_type", "hash_hex"), True),)


class _ChunkRow(_Row):
    """A piece of a content. Kept apart from all metadata: SQLite rewrites a whole row
    on any UPDATE, and a row with a large blob in it would make every status change cost
    a copy of the blob."""

    content_id = peewee.IntegerField(constraints=_references("content", "CASCADE"))
    seq = peewee.IntegerField()
    data = peewee.BlobField()

    class Meta:
        table_name = "chunk"
        indexes = ((("content_id", "seq"), True),)


class _VersionRow(_Row):
    """One version of a request: its state, pins, tags, and a reference to its content."""

    request_id = peewee.IntegerField(constraints=_references("request", "CASCADE"))
    version = peewee.CharField(max_length=20)
    status = peewee.CharField()
    content_id = peewee.IntegerField(null=True, constraints=_references("content"))
    content_hash_hex = peewee.CharField(null=True)
    pinned = peewee.BooleanField(default=False)
    pinned_until_unix = peewee.DoubleField(null=True)
    tags = peewee.TextField(default="[]")             # JSON list
    request_unix = peewee.DoubleField()
    cached_unix = peewee.DoubleField(null=True)
    validated_unix = peewee.DoubleField(null=True)
    content_attributes = peewee.TextField(default="{}")  # JSON of ResponseContentAttributes
    download_stats = peewee.TextField(default="{}")      # JSON of ResponseDownloadStats
    lease_owner = peewee.CharField(null=True)          # download lease
    lease_expires_unix = peewee.DoubleField(null=True)
    resume_from = peewee.TextField(null=True)          # JSON: validators a resume needs
    cache_headers = peewee.TextField(null=True)        # JSON: the origin's caching headers

    class Meta:
        table_name = "version"
        indexes = (
            (("request_id", "version"), True),
            (("request_id", "status", "version"), False),
            (("content_id",), False),
            (("status", "lease_expires_unix"), False),
        )


class _RemovedVersionRow(_Row):
    """A ready version that is gone (collected, deleted, or found corrupted): enough to
    say what a request served at a past moment (``as_of``) and which content that was.
    Keyed by the request's identity, not its row, so it outlives a deleted request."""

    identity_key = peewee.CharField()
    request_id = peewee.IntegerField()
    version = peewee.CharField(max_length=20)
    hash_type = peewee.CharField(null=True)
    hash_hex = peewee.CharField(null=True)
    size_bytes = peewee.BigIntegerField(null=True)
    cached_unix = peewee.DoubleField(null=True)
    removed_unix = peewee.DoubleField()
    reason = peewee.CharField()

    class Meta:
        table_name = "removed_version"
        indexes = ((("identity_key", "version"), False),)


_TABLE_MODELS = (_MetaRow, _RequestRow, _ContentRow, _ChunkRow, _VersionRow, _RemovedVersionRow)


_REQUEST_COLUMNS = tuple(_RequestRow._meta.sorted_field_names)
_VERSION_COLUMNS = tuple(_VersionRow._meta.sorted_field_names)


def _column_list(alias: str, names: tuple[str, ...]) -> str:
    return ", ".join(f'{alias}."{name}"' for name in names)


# The statements of the hot paths, as plain SQL text written once (portable SQL; the
# "?" placeholders are the driver's). peewee builds the rest; building a statement
# through it costs far more than running it, so nothing runs these through peewee.
#: A request by identity with its ready versions, newest first (one row per version).
_SQL_REQUEST_AND_READY = (
    f"SELECT {_column_list('r', _REQUEST_COLUMNS)}, {_column_list('v', _VERSION_COLUMNS)} "
    'FROM "request" AS r LEFT OUTER JOIN "version" AS v '
    """ON v."request_id" = r."id" AND v."status" = 'ready' """
    'WHERE r."identity_key" = ? ORDER BY v."version" DESC')
#: The same, with SQLite's change counter (``data_version``) in the first column and a row
#: also when there is no such request: one statement where a fetch would need two.
_SQL_STAMPED_REQUEST_AND_READY = (
    f"SELECT d.data_version, {_column_list('r', _REQUEST_COLUMNS)}, {_column_list('v', _VERSION_COLUMNS)} "
    'FROM pragma_data_version AS d LEFT OUTER JOIN "request" AS r ON r."identity_key" = ? '
    'LEFT OUTER JOIN "version" AS v '
    """ON v."request_id" = r."id" AND v."status" = 'ready' """
    'ORDER BY v."version" DESC')
#: The same for a store without such a counter, with the salt and sensitive names instead
#: (written as ``_PostgresStore._names_stamp`` writes them: keys in byte order).
_SQL_NAMED_REQUEST_AND_READY = (
    """SELECT (SELECT string_agg("key" || '=' || "value", ';' ORDER BY "key" COLLATE "C") FROM "meta" """
    """WHERE "key" IN ('salt', 'sensitive_headers', 'sensitive_params')), """
    f"{_column_list('r', _REQUEST_COLUMNS)}, {_column_list('v', _VERSION_COLUMNS)} "
    'FROM (SELECT 1) AS d LEFT OUTER JOIN "request" AS r ON r."identity_key" = ? '
    'LEFT OUTER JOIN "version" AS v '
    """ON v."request_id" = r."id" AND v."status" = 'ready' """
    'ORDER BY v."version" DESC')
#: The ready versions of a request, newest first.
_SQL_READY_ROWS = (f"SELECT {_column_list('v', _VERSION_COLUMNS)} FROM \"version\" AS v "
                   """WHERE v."request_id" = ? AND v."status" = 'ready' ORDER BY v."version" DESC""")
#: A request by id with all its versions, newest first (what publishing a download reads).
_SQL_REQUEST_AND_VERSIONS = (
    f"SELECT {_column_list('r', _REQUEST_COLUMNS)}, {_column_list('v', _VERSION_COLUMNS)} "
    'FROM "request" AS r LEFT OUTER JOIN "version" AS v ON v."request_id" = r."id" '
    'WHERE r."id" = ? ORDER BY v."version" DESC')
#: A complete content, unless one with the same hash is stored already (then nothing).
_SQL_INSERT_CONTENT = ('INSERT INTO "content" ("hash_type", "hash_hex", "size_bytes") VALUES (?, ?, ?) '
                       'ON CONFLICT DO NOTHING')
_SQL_CONTENT_ID_BY_HASH = 'SELECT "id" FROM "content" WHERE "hash_type" = ? AND "hash_hex" = ?'
#: A content's stored size and hash with its chunks in order (one row with empty chunk
#: columns when it has none): a whole read in one statement, so one snapshot.
_SQL_READ_CONTENT = ('SELECT c."size_bytes", c."hash_type", c."hash_hex", k."seq", k."data" '
                     'FROM "content" AS c LEFT OUTER JOIN "chunk" AS k ON k."content_id" = c."id" '
                     'WHERE c."id" = ? ORDER BY k."seq"')
_SQL_INSERT_CHUNK = 'INSERT INTO "chunk" ("content_id", "seq", "data") VALUES (?, ?, ?)'
#: A request by identity.
_SQL_REQUEST_BY_IDENTITY = f'SELECT {_column_list("r", _REQUEST_COLUMNS)} FROM "request" AS r WHERE r."identity_key" = ?'
#: Column defaults of a new version row (the models' defaults live in Python, not in the tables).
_VERSION_DEFAULTS = {"pinned": False, "tags": "[]", "content_attributes": "{}", "download_stats": "{}"}
#: Both lists of sensitive names the file remembers, and the salt, in one statement.
_SQL_SENSITIVE_NAMES = """SELECT "key", "value" FROM "meta" WHERE "key" IN ('salt', 'sensitive_headers', 'sensitive_params')"""
#: Placeholder for a value supplied when a prepared statement runs.
_SLOT = "\x00buffylite-slot\x00"


def _slot() -> peewee.Value:
    return peewee.Value(_SLOT, converter=False)


def _record(names: tuple[str, ...], values) -> types.SimpleNamespace:
    """A row as a plain object with one attribute per column."""
    record = types.SimpleNamespace()
    record.__dict__.update(zip(names, values))
    return record


def _set(record, changes: dict) -> None:
    """Mirror on a record read in this transaction what an UPDATE just wrote to its row."""
    for name, value in changes.items():
        setattr(record, name, value)


_TABLE_MODEL_BY_NAME = {model._meta.table_name: model for model in _TABLE_MODELS}


class _Tables:
    """The table models bound to one database (one set per Cache, so two Cache
    objects on two files never share a binding), as attributes named by table.

    Each is made on first use: peewee copies every field into a new model class, which
    costs more than the few statements a cache hit runs, and a hit needs none of them
    (its statements are SQL text written once)."""

    def __init__(self, database: peewee.Database):
        self._database = database
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        # Only called for a table not made yet (a made one is an instance attribute).
        model = _TABLE_MODEL_BY_NAME.get(name)
        if model is None or name.startswith("_"):
            raise AttributeError(name)
        with self._lock:
            bound = self.__dict__.get(name)
            if bound is None:
                meta = type("Meta", (), {"database": self._database, "table_name": name})
                bound = type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})
                setattr(self, name, bound)
        return bound

    @property
    def all(self) -> list:
        """Every table model, in the order of ``_TABLE_MODELS``."""
        return [getattr(self, model._meta.table_name) for model in _TABLE_MODELS]


# --- SQLite specifics --------------------------------------------------------


class _Connection(sqlite3.Connection):
    """An sqlite3 connection that can be weakly referenced (the base class cannot)."""


class _ClosingAll:
    """Mixed into a peewee database (one connection per thread): it remembers, weakly,
    every connection it opens, so that closing the Cache closes all of them while a
    thread that ends still drops its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._opened: weakref.WeakSet = weakref.WeakSet()
        self._opened_lock = threading.Lock()

    def _connect(self):
        connection = super()._connect()
        with self._opened_lock:
            self._opened.add(connection)
        return connection

    def close_all(self) -> None:
        """Close every connection, whichever thread opened it (the Cache is closing)."""
        with contextlib.suppress(Exception):
            self.close()
        with self._opened_lock:
            opened = list(self._opened)
            self._opened.clear()
            # Every thread forgets its closed connection (a fresh per-thread state), so
            # a later use from any thread reconnects instead of failing on a closed one.
            self._state = type(self._state)()
        for connection in opened:
            with contextlib.suppress(Exception):
                connection.close()


class _SqliteDatabase(_ClosingAll, peewee.SqliteDatabase):
    """peewee's SqliteDatabase whose connections can be weakly referenced (and so closed
    all at once)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, factory=_Connection, **kwargs)


def _sqlite_database(path: pathlib.Path, access: str | None = None) -> _SqliteDatabase:
    """A peewee database for ``path`` with the pragmas every connection needs.

    ``access`` None opens for reading and writing; ``"ro"`` opens read-only, and
    ``"immutable"`` read-only for a file nothing can change (see ``_sqlite_read_only_access``).

    WAL lets readers run beside the single writer; ``synchronous=NORMAL`` is safe in
    WAL (a power cut may lose the last commits, never corrupt); foreign keys make
    chunk rows follow their content; the busy timeout makes a writer wait for the lock
    instead of failing with "database is locked". ``check_same_thread`` is off only so
    that ``close_all`` may close other threads' connections; peewee still gives each
    thread its own.
    """
    if access is None:
        target, extra = str(path), {}
    else:
        # A URI, percent-encoded by as_uri(), so that odd characters in the path stay a path.
        mode = "immutable=1" if access == "immutable" else "mode=ro"
        target, extra = f"{pathlib.Path(os.path.abspath(path)).as_uri()}?{mode}", {"uri": True}
    return _SqliteDatabase(
        target,
        timeout=BUSY_TIMEOUT_SEC,
        check_same_thread=False,
        **extra,
        pragmas=[
            ("foreign_keys", 1),
            ("synchronous", "normal"),
            ("journal_size_limit", WAL_SIZE_LIMIT_BYTES),
            ("busy_timeout", int(BUSY_TIMEOUT_SEC * 1000)),
            # Statement journals in memory: with 16 KiB pages, the journal of one UPDATE of a
            # version row and its indexes would otherwise spill to a temporary file, which
            # made that statement cost ~100 µs instead of ~30. This stays bounded only
            # because freed pages are not overwritten (next line): where SQLite is built to
            # zero them (Debian's is), deleting a content would journal all of its pages.
            ("temp_store", "memory"),
            # Deleted rows are still zeroed on the pages that keep living, but whole pages
            # freed by a deletion are not rewritten with zeros: that wrote every byte of a
            # deleted content to the WAL once more.
            ("secure_delete", "fast"),
        ],
    )


def _sqlite_is_read_only(path: pathlib.Path) -> bool:
    """True when an existing cache file cannot be written by this process: the file is
    not writable (permissions, read-only media), or its folder is not, so SQLite could
    not create the write-ahead log a writer needs (unless both WAL files already exist
    and are writable)."""
    if not path.exists():
        return False
    if not os.access(path, os.W_OK):
        return True
    if os.access(path.parent, os.W_OK):
        return False
    side_files = [pathlib.Path(str(path) + suffix) for suffix in ("-wal", "-shm")]
    return not all(side.exists() and os.access(side, os.W_OK) for side in side_files)


def _sqlite_read_only_access(path: pathlib.Path) -> str:
    """How to open a cache file read-only: ``"ro"``, or ``"immutable"`` when SQLite could
    neither find nor create the ``-wal``/``-shm`` files a WAL reader needs (a folder we
    cannot write). Nothing can be writing such a file in WAL mode (a writer would need
    those files), so reading it as immutable is safe; a WAL left behind without its
    ``-shm`` is then ignored, which loses at most commits that were never checkpointed."""
    if os.access(path.parent, os.W_OK):
        return "ro"
    wal, shm = (pathlib.Path(str(path) + suffix) for suffix in ("-wal", "-shm"))
    if wal.exists() and shm.exists():
        return "ro"
    if wal.exists() and wal.stat().st_size:
        log.warning("The read-only cache %s has a write-ahead log but no -shm file; its last "
                    "commits are not visible.", path)
    return "immutable"


def _remove_reader_side_files(path: pathlib.Path) -> None:
    """Have SQLite remove the -wal/-shm files a read-only reader had to create.

    Only a read-write connection may remove them, and SQLite's own rule decides: the
    last connection to close removes them when it gets the exclusive lock, i.e. when no
    other connection (of any process) has the file open; otherwise they stay for those.
    The log is empty (read-only readers write nothing), so the database file itself is
    not changed. Nothing happens when the file cannot be opened for writing."""
    if not os.access(path, os.W_OK) or not os.path.exists(str(path) + "-wal"):
        return
    with contextlib.suppress(sqlite3.Error, OSError):
        connection = sqlite3.connect(str(path), timeout=0)
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            connection.close()


def _sqlite_check_header(path: pathlib.Path) -> None:
    """Refuse a non-empty file that is not SQLite, before SQLite touches it, and
    anything that is not a regular file (opening a FIFO would wait for a writer forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CacheFileError(f"The cache file {path} cannot be read: {exc}.", path=path) from exc
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) \
            else "not a regular file"
        raise CacheFileError(f"The cache file {path} cannot be used: it is {kind}, not a regular file.",
                             path=path)
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CacheFileError(f"The cache file {path} cannot be read: {exc}.", path=path) from exc
    if header and header != _SQLITE_MAGIC:
        raise CacheFileError(f"The file {path} is not a buffylite cache (not an SQLite database).",
                             path=path)


def _sqlite_file_marks(database: peewee.Database) -> tuple[int, int, int]:
    """(application_id, user_version, number of tables) of the open file."""
    application_id = database.execute_sql("PRAGMA application_id").fetchone()[0]
    user_version = database.execute_sql("PRAGMA user_version").fetchone()[0]
    tables = database.execute_sql("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
    return application_id, user_version, tables


def _sqlite_change_counter(database: peewee.Database) -> int:
    """A number that changes whenever another connection commits to the file."""
    return database.connection().execute("PRAGMA data_version").fetchone()[0]


def _sqlite_prepare_new_file(database: peewee.Database) -> None:
    """File-level settings that must precede the first table: the page size, incremental
    auto-vacuum (so freed pages can be given back and the file shrinks), then WAL
    (persistent; the page size cannot change once the file is in WAL mode)."""
    database.execute_sql(f"PRAGMA page_size={PAGE_SIZE_BYTES}")
    database.execute_sql("PRAGMA auto_vacuum=INCREMENTAL")
    database.execute_sql("PRAGMA journal_mode=WAL")


def _sqlite_mark_file(database: peewee.Database, schema_version: int) -> None:
    """Stamp the file as buffylite's, at ``schema_version``. Runs inside the migration's transaction."""
    database.execute_sql(f"PRAGMA application_id={APPLICATION_ID}")
    database.execute_sql(f"PRAGMA user_version={int(schema_version)}")


def _sqlite_give_back_free_pages(database: peewee.Database, *, checkpoint: bool) -> None:
    """Return freed pages to the file system; with ``checkpoint`` also fold the WAL in
    so the main file shrinks now (not at the next automatic checkpoint)."""
    # Through a cursor, Python's sqlite3 steps this pragma once, freeing one page;
    # executescript runs it to completion. Never called inside a transaction.
    database.connection().executescript("PRAGMA incremental_vacuum;")
    if checkpoint:
        # TRUNCATE waits for readers through the busy handler; an open Response.open()
        # stream is such a reader. Wait briefly, then leave the rest to a later checkpoint.
        database.execute_sql(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
        try:
            database.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            database.execute_sql(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SEC * 1000)}")


def _sqlite_snapshot_into(database: peewee.Database, target: pathlib.Path) -> None:
    """Write a consistent, compact copy of the open file to ``target`` (an empty file).
    ``VACUUM INTO`` reads one snapshot, so writers in other connections go on meanwhile
    and the copy is never torn; it also leaves out free pages. The copy is in rollback
    journal mode until ``_sqlite_finish_copy``."""
    database.connection().execute("VACUUM INTO ?", (str(target),))


def _sqlite_finish_copy(database: peewee.Database, *, compact: bool) -> None:
    """Make a private copy an ordinary cache file: compacted again after rows were
    removed (``compact``), and in WAL mode like every cache file."""
    if compact:
        # VACUUM rebuilds the file through a temporary copy of it: on disk, not in memory
        # (the connection keeps its temporary storage in memory otherwise).
        database.execute_sql("PRAGMA temp_store=FILE")
        database.execute_sql("VACUUM")
    database.execute_sql("PRAGMA journal_mode=WAL")


def _sqlite_remove_side_files(path: pathlib.Path) -> None:
    """Remove the ``-wal``, ``-shm`` and ``-journal`` files of a closed private copy."""
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.unlink(str(path) + suffix)


def _sqlite_write_transaction(database: peewee.SqliteDatabase):
    """A write transaction taking the lock up front (``BEGIN IMMEDIATE``): a deferred one
    that later needs to write can fail at once with SQLITE_BUSY in WAL mode instead of
    waiting for the busy timeout."""
    return database.atomic(lock_type="IMMEDIATE")


# --- schema migrations ---------------------------------------------------------


def _migrate_to_1(store: "_Store") -> None:
    """Version 1: the five tables and the salt for sensitive header digests."""
    t = store.tables
    for model in (t.meta, t.request, t.content, t.chunk, t.version):  # referenced tables first
        model.create_table(safe=True)
    store.prepare_chunk_table()
    store.tables.meta.create(key="salt", value=secrets.token_hex(32))
    store.tables.meta.create(key="created_unix", value=repr(store.now()))


def _migrate_to_3(store: "_Store") -> None:
    """Version 3: the failure backoff on the request row, the origin's caching headers
    on the version row. Files created at version 1 by this code already have the
    columns (the tables are created from the current models), so only missing ones are
    added."""
    for model, names in ((store.tables.request, ("backoff_until_unix", "backoff_failure")),
                         (store.tables.version, ("cache_headers",))):
        table = model._meta.table_name
        present = {column.name for column in store.db.get_columns(table, schema=store.schema_name)}
        for name in names:
            if name not in present:
                import playhouse.migrate  # noqa: PLC0415 - only old files need it
                migrator = playhouse.migrate.SchemaMigrator.from_database(store.db)
                playhouse.migrate.migrate(migrator.add_column(table, name, model._meta.fields[name]))


#: Ordered migrations: (schema version reached, function). Each runs in one write transaction.
def _migrate_to_2(store: "_Store") -> None:
    """Version 2: the record of removed versions (for ``as_of`` and lockfiles)."""
    store.db.create_tables([store.tables.removed_version], safe=True)


_MIGRATIONS = ((1, _migrate_to_1), (2, _migrate_to_2), (3, _migrate_to_3))


#: Removed-version records kept per request identity among those ``as_of`` only names in
#: its message (see ``_Store.prune_removed``); the records it needs to answer honestly stay.
REMOVED_VERSION_RECORDS_KEPT = 100


class _Store:
    """The cache's database: connections (one per thread, reopened after fork),
    transactions, error translation, the statements every fetch runs, and chunked
    content I/O. It comes in two kinds, ``_SqliteStore`` (a file) and ``_PostgresStore``
    (a schema on a database server); whatever differs between the two lives in those
    classes, below this one (``_open_store`` picks one for a location)."""

    #: How messages name it.
    noun = "cache"
    #: Driver exceptions that ``_DriverErrors`` turns into CacheFileError.
    driver_errors: tuple = (peewee.DatabaseError, peewee.InterfaceError, sqlite3.Error)
    #: The schema holding the tables (None: the database's only one).
    schema_name: str | None = None
    #: Whether it is one local file (backups, checks and sizes that work on files).
    is_file = True

    path: Any          # what messages show: a Path, or a URL without its password
    read_only: bool

    def _start(self) -> None:
        """Connect, create or upgrade the schema, and read the salt and sensitive names."""
        self._open_database()
        with self._translated():
            self._upgrade_schema()
        # The salt, and the sensitive names the first fetch needs, read at once.
        self.sensitive_names()

    # --- connections and transactions ---

    def _open_database(self) -> None:
        self._pid = os.getpid()
        self._statements: dict[str, tuple[str, list]] = {}
        self._sql_texts: dict[tuple, str] = {}
        self._local = threading.local()  # per thread: the memo of hot reads, own commits
        self.db = self._new_database()
        self.tables = _Tables(self.db)

    def _ensure_same_process(self) -> None:
        """After fork, use connections of this process's own."""
        if os.getpid() != self._pid:
            self._forget_inherited_connections()
            self._open_database()

    def _forget_inherited_connections(self) -> None:
        """What to do with the parent's connections in a forked child (SQLite: drop them;
        sharing one SQLite handle across processes corrupts its locking)."""

    def _translated(self) -> "_DriverErrors":
        """The one place where driver errors become CacheFileError (keeping the cause)."""
        return _DriverErrors(self)

    def reading(self) -> "_DriverErrors":
        """Reads outside any explicit transaction (each statement sees a consistent
        snapshot); ``with store.reading() as t`` gives the tables."""
        self._ensure_same_process()
        return _DriverErrors(self)

    @contextlib.contextmanager
    def writing(self) -> Iterator[_Tables]:
        """A short write transaction holding the store's write lock from its start.
        Never hold one across network I/O. Raises CacheFileError at once on a
        read-only cache."""
        self._ensure_same_process()
        self.require_writable()
        try:
            with self._translated(), self._write_transaction():
                yield self.tables
        finally:
            # This connection's own commits do not move the change stamp: count them.
            self._local.writes = getattr(self._local, "writes", 0) + 1

    def require_writable(self) -> None:
        """Raise CacheFileError when the cache was opened read-only."""
        if self.read_only:
            raise CacheFileError(f"The cache {self.path} is read-only: this operation needs to write "
                                 "to it. Write to a copy made with Cache.backup() instead.", path=self.path)

    def close(self) -> None:
        """Close every connection of this store."""
        self._local = threading.local()  # A new connection restarts the change stamp.
        self.db.close_all()

    # --- what each kind provides ---

    def _new_database(self) -> peewee.Database:
        """A peewee database for this store (one connection per thread)."""
        raise NotImplementedError

    def _write_transaction(self):
        """A context manager: one write transaction that takes the write lock first."""
        raise NotImplementedError

    def _schema_marks(self) -> tuple[bool, int]:
        """(True when the database holds something that is not a buffylite cache, the
        schema version of the cache: 0 before the first migration)."""
        raise NotImplementedError

    def _prepare_new(self) -> None:
        """Settings a new cache needs before its first table."""

    def _mark_schema(self, version: int) -> None:
        """Record ``version`` as reached; runs inside the migration's transaction."""
        raise NotImplementedError

    def change_stamp(self):
        """A value that changes whenever another connection commits, or None when this
        store cannot tell cheaply (then every read goes to the database)."""
        return None

    def now(self) -> float:
        """The time that orders and expires what is stored (a Unix timestamp)."""
        return _now()

    def begin_snapshot(self, database: peewee.Database) -> None:
        """Open a read transaction on ``database`` (a connection of its own) that sees one
        consistent snapshot until it ends."""
        database.begin()

    def structural_problems(self) -> list[str]:
        """What the database's own checks find wrong, as sentences; empty when sound."""
        return []

    def give_back_free_pages(self, *, checkpoint: bool) -> None:
        """Let the space of removed rows be reused (``checkpoint``: gc() is ending)."""

    def file_size(self) -> int:
        """Bytes the cache occupies in storage."""
        raise NotImplementedError

    def database_version(self) -> str:
        """The kind of database and its version, e.g. "SQLite 3.45.1"."""
        raise NotImplementedError

    def extra_stats(self) -> dict:
        """Facts for ``stats()`` only this kind of store has."""
        return {}

    def masked(self, text: str) -> str:
        """``text`` (a driver's message) without the secrets of the location."""
        return text

    def drop_broken_connection(self) -> None:
        """After a driver error: forget this thread's connection if it is broken (the
        server restarted, the network failed), so the next call connects again."""

    def prepare_chunk_table(self) -> None:
        """Storage settings of the new chunk table (in the first migration's transaction)."""

    def _inserted_id(self, sql: str, values) -> int | None:
        """Run an INSERT given as SQL text; the new row's id, or None when it inserted
        nothing (``ON CONFLICT DO NOTHING``)."""
        cursor = self._run(sql, *values)
        return cursor.lastrowid if cursor.rowcount == 1 else None

    # --- schema ---

    def _upgrade_schema(self) -> None:
        foreign, version = self._schema_marks()
        if foreign:
            raise CacheFileError(f"The {self.noun} {self.path} is a database but not a buffylite cache.",
                                 path=self.path)
        if version > SCHEMA_VERSION:
            raise CacheFileError(
                f"The {self.noun} {self.path} has schema version {version}, newer than this "
                f"buffylite {__version__} understands ({SCHEMA_VERSION}); upgrade buffylite.",
                path=self.path)
        if version == SCHEMA_VERSION:
            return
        if self.read_only:
            if version == 0:
                raise CacheFileError(f"The read-only {self.noun} {self.path} is not a buffylite cache (it "
                                     "has no buffylite tables).", path=self.path)
            # An older cache cannot be upgraded here. Migrations only add, so what it holds
            # stays readable (a seed shipped with an older release keeps working); a
            # feature that needs a newer table fails with CacheFileError when used.
            log.info("The read-only cache %s has schema version %d (current %d); it is read "
                     "without upgrading.", self.path, version, SCHEMA_VERSION)
            return
        if version == 0:
            self._prepare_new()
        for target_version, migrate in _MIGRATIONS:
            with self._write_transaction():
                # Another process may have migrated while we waited for the lock.
                if self._schema_marks()[1] >= target_version:
                    continue
                migrate(self)
                self._mark_schema(target_version)

    def remember_sensitive_names(self, kind: str, names: set[str]) -> frozenset[str]:
        """Add ``names`` (lower-case) to the sensitive names of ``kind`` ("headers" or
        "params") kept in the cache, and return them all: a request's identity, and what
        is stored in clear, must not depend on which Cache object opened the cache."""
        meta, key = self.tables.meta, f"sensitive_{kind}"
        known = self.sensitive_names()[kind]
        if self.read_only:  # Nothing can be stored, so nothing is stored with them either.
            return known
        if not names <= known:
            with self.writing():
                row = meta.get_or_none(meta.key == key)
                known = set(json.loads(row.value)) if row is not None else set()
                known |= names
                meta.insert(key=key, value=json.dumps(sorted(known))).on_conflict(
                    conflict_target=[meta.key], update={meta.value: json.dumps(sorted(known))}).execute()
            self._local.sensitive = None  # (this connection's own commit: read them again)
        return self.sensitive_names()[kind]

    def sensitive_names(self, *, fresh: bool = True) -> dict[str, frozenset[str]]:
        """The sensitive header and parameter names the cache remembers, as
        ``{"headers": ..., "params": ..., "sets": (built-in + stored header names, params)}``
        (lower-case); re-read only when the cache changed (another Cache object, in this
        process or another, may have added some). ``fresh=False`` (the fetch hot path)
        trusts what this thread read last unless ``request_and_ready_rows`` has seen the
        cache change since; the claim of a download checks afresh before writing."""
        self._ensure_same_process()
        local = self._local
        remembered = getattr(local, "sensitive", None)
        if not fresh and remembered is not None:
            return remembered[1]
        # Only other connections' commits can change the names: this thread's own
        # change (remember_sensitive_names) forgets what it read.
        with self._translated():
            stamp = self.change_stamp()
        if remembered is not None and stamp is not None and remembered[0] == stamp:
            return remembered[1]
        names = {}
        with self.reading():
            stored = dict(self._run(_SQL_SENSITIVE_NAMES).fetchall())
        stamp = self._names_stamp(stored, stamp)
        if not hasattr(self, "salt"):
            try:
                self.salt = bytes.fromhex(stored["salt"])
            except (KeyError, TypeError, ValueError):
                raise CacheFileError(f"The salt stored in {self.path} is missing or damaged.",
                                     path=self.path) from None
        for kind in ("headers", "params"):
            value = stored.get(f"sensitive_{kind}")
            try:
                names[kind] = frozenset(json.loads(value)) if value is not None else frozenset()
            except (TypeError, ValueError):
                raise CacheFileError(f"The sensitive {kind} names stored in {self.path} are damaged.",
                                     path=self.path) from None
        # Built once per change: identities compare and hash this pair on every fetch.
        names["sets"] = (SENSITIVE_HEADERS | names["headers"], names["params"])
        local.sensitive = (stamp, names)
        return names

    def schema_version(self) -> int:
        with self.reading():
            return self._schema_marks()[1]

    # --- prepared statements (the fetch hot path) ---
    #
    # Building SQL through peewee costs far more than running it (about 100 µs per
    # query against a few µs in SQLite), so the queries every fetch runs are built by
    # peewee once per store and then executed with fresh values.

    def _run(self, sql: str, *values):
        """Run one statement given as SQL text on this thread's connection (inside
        whatever transaction the caller holds)."""
        return self.db.connection().execute(sql, values)

    def _execute(self, name: str, build: Callable[[_Tables], peewee.Query], *values):
        statement = self._statements.get(name)
        if statement is None:
            statement = self._statements[name] = build(self.tables).sql()
        sql, template = statement
        supplied = iter(values)
        # Straight to the driver: peewee's per-statement bookkeeping would double the cost.
        return self.execute_on(self.db.connection(),
                               sql, [next(supplied) if param == _SLOT else param for param in template])

    @staticmethod
    def execute_on(connection, sql: str, values):
        """Run ``sql`` on a driver connection (the one place that calls the driver)."""
        return connection.execute(sql, values)

    def request_and_ready_rows(self, identity_key: str):
        """(request record or None, its ready version records newest first), in one query.

        Remembered per thread until the file changes: the change counter tells when any
        other connection (thread or process) committed, and this thread's own commits
        are counted by ``writing()``. Callers must not modify the records.
        """
        self._ensure_same_process()
        local = self._local
        memo = local.__dict__.setdefault("memo", {})
        remembered = memo.get(identity_key)
        writes = getattr(local, "writes", 0)
        if remembered is not None:  # one cheap statement tells whether it still holds
            with self._translated():
                changes = self.change_stamp()
            if changes is not None and remembered[0] == (changes, writes):
                return remembered[1]
        # Otherwise one statement reads the rows and what tells whether the names changed.
        with self.reading():
            names_stamp, changes, rows = self._read_request_and_ready(identity_key)
        sensitive = getattr(local, "sensitive", None)
        if sensitive is not None and (names_stamp is None or sensitive[0] != names_stamp):
            local.sensitive = None  # They may have: the next identity re-reads the names.
        split = len(_REQUEST_COLUMNS)
        result = (_record(_REQUEST_COLUMNS, rows[0][:split]) if rows else None,
                  [_record(_VERSION_COLUMNS, row[split:]) for row in rows if row[split] is not None])
        if changes is not None:
            if len(memo) >= IDENTITY_MEMO_SIZE:
                memo.clear()
            memo[identity_key] = ((changes, writes), result)
        return result

    def _read_request_and_ready(self, identity_key: str) -> tuple[Any, Any, list]:
        """(a stamp of the sensitive names as ``_names_stamp`` makes it, the change stamp,
        the rows of ``_SQL_REQUEST_AND_READY``); a stamp is None where the store has none."""
        return None, None, self._run(_SQL_REQUEST_AND_READY, identity_key).fetchall()

    def _names_stamp(self, stored: dict, change_stamp):
        """What tells, on the fetch path, whether the sensitive names read as ``stored``
        (at ``change_stamp``) may have changed since."""
        return change_stamp

    def request_and_versions(self, request_id: int):
        """(request record or None, all its version records newest first), in one query.
        Inside a write transaction, what the caller then changes it also changes on
        these records (see ``_set``)."""
        with self.reading():
            rows = self._run(_SQL_REQUEST_AND_VERSIONS, request_id).fetchall()
        split = len(_REQUEST_COLUMNS)
        return (_record(_REQUEST_COLUMNS, rows[0][:split]) if rows else None,
                [_record(_VERSION_COLUMNS, row[split:]) for row in rows if row[split] is not None])

    def request_by_identity(self, identity_key: str):
        """The request record with this identity key, or None."""
        with self.reading():
            row = self._run(_SQL_REQUEST_BY_IDENTITY, identity_key).fetchone()
        return _record(_REQUEST_COLUMNS, row) if row is not None else None

    def _statement(self, key: tuple, build: Callable[[], str]) -> str:
        """The SQL text for ``key``, built by ``build`` the first time only."""
        sql = self._sql_texts.get(key)
        if sql is None:
            sql = self._sql_texts[key] = build()
        return sql

    def insert_row(self, table: str, values: dict, *, unless_present: bool = False) -> int | None:
        """INSERT one row into ``table``; return its id. ``unless_present``: insert nothing
        when a row with the same unique key exists, and return None. The statement text
        is built once per table and set of columns. Runs inside the caller's write
        transaction."""
        names = tuple(values)
        sql = self._statement(("insert", table, names, unless_present), lambda: (
            f'INSERT INTO "{table}" (' + ", ".join(f'"{name}"' for name in names) + ") VALUES ("
            + ", ".join("?" * len(names)) + ")" + (" ON CONFLICT DO NOTHING" if unless_present else "")))
        with self.reading():
            return self._inserted_id(sql, values.values())

    def update_row(self, table: str, row_id: int, changes: dict) -> int:
        """UPDATE the row ``row_id`` of ``table``; return how many rows changed (0 or 1).
        The statement text is built once per table and set of columns. Runs inside the
        caller's write transaction."""
        names = tuple(changes)
        sql = self._statement(("update", table, names), lambda: (
            f'UPDATE "{table}" SET ' + ", ".join(f'"{name}" = ?' for name in names) + ' WHERE "id" = ?'))
        with self.reading():
            return self._run(sql, *changes.values(), row_id).rowcount

    def owned_by(self, claim) -> peewee.Expression:
        """The lease-ownership condition, written here only: the version row ``claim``
        took, still recorded as leased to ``claim.owner``. Another process takes a lease
        over only by writing its own owner there, so a download that finds this false
        has lost its lease and must stop writing. (``publish_first_version`` states the
        same condition in SQL text.)"""
        version = self.tables.version
        return (version.id == claim.row_id) & (version.lease_owner == claim.owner)

    def publish_first_version(self, row_id: int, owner: str, request_id: int, changes: dict) -> bool:
        """UPDATE the version row ``row_id`` with ``changes`` if ``owner`` still holds its
        lease and it is the only version of its request; return whether it did. Lets the
        first download of a new request be published without reading the request back.
        Runs inside the caller's write transaction."""
        names = tuple(changes)
        sql = self._statement(("publish first", names), lambda: (
            'UPDATE "version" SET ' + ", ".join(f'"{name}" = ?' for name in names)
            + ' WHERE "id" = ? AND "lease_owner" = ? AND NOT EXISTS (SELECT 1 FROM "version" AS o'
            ' WHERE o."request_id" = ? AND o."id" <> ?)'))
        with self.reading():
            return self._run(sql, *changes.values(), row_id, owner, request_id, row_id).rowcount == 1

    def store_small_content(self, hash_type: str, hash_hex: str, data: bytes) -> int:
        """Store a complete content held in memory, unless the same content is stored
        already; return its id. Runs inside the caller's write transaction."""
        content_id = self._inserted_id(_SQL_INSERT_CONTENT, (hash_type, hash_hex, len(data)))
        if content_id is None:
            return self._run(_SQL_CONTENT_ID_BY_HASH, hash_type, hash_hex).fetchone()[0]
        if data:
            self._run(_SQL_INSERT_CHUNK, content_id, 0, data)
        return content_id

    def ready_rows(self, request_id: int) -> list:
        """The request's ready version records, newest first."""
        with self.reading():
            return [_record(_VERSION_COLUMNS, row)
                    for row in self._run(_SQL_READY_ROWS, request_id).fetchall()]

    def removed_versions(self, identity_key: str, after_version: str) -> list:
        """The removed-version records of a request identity newer than ``after_version``,
        newest first (for ``as_of``)."""
        removed = self.tables.removed_version
        with self.reading():
            return list(removed.select().where(
                (removed.identity_key == identity_key) & (removed.version > after_version)
                & removed.cached_unix.is_null(False)).order_by(removed.version.desc()))

    # --- content I/O ---

    def iter_chunks(self, content_id: int) -> Iterator[bytes]:
        """The chunks of a content in order, one at a time (bounded memory). Raises
        IntegrityError when what they add up to is not the stored content (a chunk
        missing, or a length differing from the stored size), never yielding less
        silently at the end."""
        def build(t: _Tables):
            return (t.chunk.select(t.chunk.seq, t.chunk.data)
                    .where((t.chunk.content_id == _slot()) & (t.chunk.seq > _slot()))
                    .order_by(t.chunk.seq).limit(1))
        with self.reading():
            size = self._content_size(content_id)
        seq, count, length = -1, 0, 0
        while True:
            with self.reading():
                row = self._execute("next_chunk", build, content_id, seq).fetchone()
            if row is None:
                break
            seq, data = row
            self._check_chunk(content_id, seq, count, data)
            count += 1
            length += len(data)
            yield bytes(data)
        self._check_assembled(content_id, size, length)

    def read_content(self, content_id: int) -> tuple[bytes, str, str | None]:
        """(the whole content, its hash type, its stored hash or None when partial or
        corrupted), from one query, so one snapshot. Raises NotCachedError when the
        content was deleted, IntegrityError when the chunks do not assemble into the
        stored size (a chunk missing, or one cut short): never shorter content."""
        with self.reading():
            rows = self._run(_SQL_READ_CONTENT, content_id).fetchall()
        if not rows:
            raise NotCachedError(f"This version's content is no longer in the cache {self.path} "
                                 "(the version was deleted or collected).")
        size, hash_type, hash_hex = rows[0][:3]
        if rows[0][3] is None:  # no chunk at all
            rows = []
        for count, row in enumerate(rows):
            self._check_chunk(content_id, row[3], count, row[4])
        data = b"".join([row[4] for row in rows])
        self._check_assembled(content_id, size, len(data))
        return data, hash_type, hash_hex

    def _content_size(self, content_id: int) -> int:
        """The stored size of a content; NotCachedError when it is gone."""
        size = (self.tables.content.select(self.tables.content.size_bytes)
                .where(self.tables.content.id == content_id).tuples().first())
        if size is None:
            raise NotCachedError(f"This version's content is no longer in the cache {self.path} "
                                 "(the version was deleted or collected).")
        return size[0]

    def _check_chunk(self, content_id: int, seq, expected_seq: int, data) -> None:
        if seq != expected_seq or not isinstance(data, (bytes, bytearray, memoryview)):
            raise IntegrityError(f"Content {content_id} in the cache {self.path} is damaged: chunk "
                                 f"{expected_seq} is missing or unreadable (found {seq!r}).")

    def _check_assembled(self, content_id: int, size, length: int) -> None:
        if not isinstance(size, int) or size != length:
            raise IntegrityError(f"Content {content_id} in the cache {self.path} is damaged: its "
                                 f"chunks hold {length} bytes, the stored size is {size!r}.")

    def _require_content(self, content_id: int) -> None:
        """Raise NotCachedError when the content was deleted (the version was collected)."""
        self._content_size(content_id)

    def open_content(self, content_id: int, *, check_hash: str | None = None) -> "_ContentStream":
        """A seekable stream over a content, reading one snapshot (see ``_ContentStream``).
        ``check_hash``: the hex digest the bytes must have when read through to the end."""
        self._ensure_same_process()
        with self._translated():
            return _ContentStream(self, content_id, check_hash=check_hash)

    def content_statements(self) -> dict[str, tuple[str, list]]:
        """The SQL a ``_ContentStream`` runs on its own connection, built once per store:
        the content's head row, its chunk layout, and one chunk by sequence number.
        ``length()`` of a blob is read from the record header, not from the blob's pages."""
        statements = self._statements.get("content_stream")
        if statements is None:
            chunk, content = self.tables.chunk, self.tables.content
            statements = self._statements["content_stream"] = {
                "head": content.select(content.hash_type, content.hash_hex, content.size_bytes)
                .where(content.id == _slot()).sql(),
                "layout": chunk.select(chunk.seq, peewee.fn.length(chunk.data))
                .where(chunk.content_id == _slot()).order_by(chunk.seq).sql(),
                "chunk": chunk.select(chunk.data)
                .where((chunk.content_id == _slot()) & (chunk.seq == _slot())).sql(),
            }
        return statements

    def content_head(self, content_id: int) -> tuple[str, str | None, int] | None:
        """(hash type, hash or None when partial or corrupted, size) of a content, or None."""
        with self.reading() as t:
            return (t.content.select(t.content.hash_type, t.content.hash_hex, t.content.size_bytes)
                    .where(t.content.id == content_id).tuples().first())

    def has_content(self, hash_type: str, hash_hex: str) -> bool:
        """True when a complete, uncorrupted content with this hash is stored."""
        with self.reading() as t:
            return t.content.select(t.content.id).where(
                (t.content.hash_type == hash_type) & (t.content.hash_hex == hash_hex)).exists()

    def mark_content_corrupted(self, content_id: int, expected_hex: str | None = None) -> list[int]:
        """Content whose bytes no longer hash to what was stored: it stops being
        addressable (a new identical download must not reuse it), its ready versions
        become ``failed`` with the error "content corrupted" (out of the chain) and are
        remembered as removed (for ``as_of``). With ``expected_hex`` (a read found the
        mismatch), nothing happens unless the content still claims that hash (already
        handled otherwise). Returns the version ids marked."""
        with self.writing() as t:
            content = t.content.get_or_none(t.content.id == content_id)
            if content is None or (expected_hex is not None and content.hash_hex != expected_hex):
                return []
            t.content.update(hash_hex=None).where(t.content.id == content_id).execute()
            rows = list(t.version.select().where((t.version.content_id == content_id)
                                                 & (t.version.status == "ready")))
            now = self.now()
            for row in rows:
                try:
                    stats = json.loads(row.download_stats or "{}")
                    stats = stats if isinstance(stats, dict) else {}
                except ValueError:
                    stats = {}
                stats.update(state="failed", error=CORRUPTED_ERROR)
                t.version.update(status="failed", download_stats=json.dumps(stats)).where(
                    t.version.id == row.id).execute()
                request = t.request.get_or_none(t.request.id == row.request_id)
                if request is not None:
                    self.record_removed(request, [row], "corrupted", now)
        # A read that finds it says so loudly; verify() reports it in its own words.
        log.log(logging.WARNING if expected_hex is not None else logging.INFO,
                "Content %s is corrupted; %d version(s) marked failed.", content.hash_hex, len(rows))
        return [row.id for row in rows]

    def record_removed(self, request, rows: list, reason: str, now: float) -> None:
        """Remember ready versions that leave the cache (for ``as_of``): version, hash,
        size, cached and removed times. Runs in the transaction that removes them."""
        if not rows:
            return
        t = self.tables
        contents = {content_id: (hash_type, size) for content_id, hash_type, size in t.content.select(
            t.content.id, t.content.hash_type, t.content.size_bytes).where(
            t.content.id.in_([row.content_id for row in rows if row.content_id is not None])).tuples()}
        t.removed_version.insert_many([
            {"identity_key": request.identity_key, "request_id": request.id, "version": row.version,
             "hash_type": contents.get(row.content_id, (request.validation_hash_type,))[0],
             "hash_hex": row.content_hash_hex,
             "size_bytes": contents.get(row.content_id, (None, None))[1], "cached_unix": row.cached_unix,
             "removed_unix": now, "reason": reason} for row in rows]).execute()

    # --- named transitions: downloads ---
    #
    # The claim, the lease, the content and the publication of a download. Those that
    # say so run inside the caller's write transaction (the claim and the settlement
    # each make one transaction of several of them); the others are one transaction.

    def request_by_id(self, request_id: int):
        """The request row ``request_id`` (a model instance); NotCachedError when it is gone."""
        with self.reading() as t:
            row = t.request.get_or_none(t.request.id == request_id)
        if row is None:
            raise NotCachedError(f"Request {request_id} is no longer in the cache {self.path}.")
        return row

    def in_flight_rows(self, request_id: int) -> list:
        """The request's rows of downloads not settled yet (wait, in_progress), newest
        first. Runs inside the caller's write transaction."""
        version = self.tables.version
        return list(version.select().where((version.request_id == request_id)
                                           & version.status.in_(IN_FLIGHT_STATUSES))
                    .order_by(version.version.desc()))

    def newest_version_string(self, request_id: int, *, excluding: int | None = None) -> str | None:
        """The greatest version string among the request's rows (but row ``excluding``).
        Runs inside the caller's write transaction."""
        version = self.tables.version
        condition = version.request_id == request_id
        if excluding is not None:
            condition &= version.id != excluding
        return version.select(peewee.fn.MAX(version.version)).where(condition).scalar()

    def add_download_row(self, request_id: int, version: str, now: float, lease: dict) -> int:
        """A new ``wait`` row for a download, leased as ``lease`` says; its id. Runs
        inside the caller's write transaction."""
        return self.insert_row("version", {"request_id": request_id, "version": version, "status": "wait",
                                           "request_unix": now, **_VERSION_DEFAULTS, **lease})

    def download_state(self, request_id: int, row_id: int):
        """(the row of a download or None when it is gone, the request's note on how its
        last download ended), from one snapshot each, for a call waiting on it."""
        with self.reading() as t:
            row = t.version.get_or_none(t.version.id == row_id)
            settlement = t.request.select(t.request.last_settlement).where(
                t.request.id == request_id).scalar()
        return row, settlement

    def owned_row(self, claim):
        """The row of ``claim`` while it still holds the lease (see ``owned_by``), else
        None. Runs inside the caller's write transaction."""
        return self.tables.version.get_or_none(self.owned_by(claim))

    def delete_version(self, row_id: int) -> None:
        """Delete one version row. Runs inside the caller's write transaction."""
        self.tables.version.delete().where(self.tables.version.id == row_id).execute()

    def discard_download(self, claim) -> None:
        """Delete the row of ``claim`` (while it holds the lease) and its partial
        content, in one transaction."""
        with self.writing():
            row = self.owned_row(claim)
            if row is not None:
                self.delete_version(row.id)
                if row.content_id is not None:
                    self.delete_unreferenced_contents({row.content_id})

    def give_up_lease(self, claim) -> None:
        """End the lease of ``claim`` now, keeping its row and partial content for a
        resume (or for gc())."""
        with self.writing() as t:
            t.version.update(lease_expires_unix=0.0).where(self.owned_by(claim)).execute()

    def renew_lease(self, claim, lease_sec: float) -> bool:
        """Extend the lease of ``claim`` to ``lease_sec`` from now; False when it was lost."""
        with self.writing() as t:
            return bool(t.version.update(lease_expires_unix=self.now() + lease_sec)
                        .where(self.owned_by(claim)).execute())

    def _require_lease(self, claim) -> None:
        """Raise _LeaseLost unless ``claim`` still holds its lease: the recorded owner of a
        lease not given up (another process takes a lease over only by writing its own
        owner; judging the lease end by this process's clock would let a clock jump end a
        live download). Runs inside the caller's write transaction, so nothing can take
        the lease before it commits."""
        version = self.tables.version
        if not version.select().where(self.owned_by(claim) & (version.lease_expires_unix > 0)).exists():
            raise _LeaseLost()

    def append_chunk(self, claim, content_id: int | None, hash_type: str, seq: int, data: bytes | None,
                     begin: dict | None) -> int:
        """Store the next chunk of a download in one transaction, only while ``claim``
        holds its lease (_LeaseLost otherwise, checked first): the first one creates the
        partial content and points the row at it; ``begin`` (version columns the
        response's headers gave) is written with it; ``data`` None stores no chunk.
        Returns the content id."""
        with self.writing() as t:
            self._require_lease(claim)  # First: never write for a download someone took over.
            if content_id is None:
                content_id = self.insert_row("content", {"hash_type": hash_type, "hash_hex": None,
                                                         "size_bytes": 0})
                self.update_row("version", claim.row_id, {"content_id": content_id, **(begin or {})})
            elif begin:  # the origin sent the whole body again (a restart)
                self.update_row("version", claim.row_id, begin)
            if data is not None:
                self._run(_SQL_INSERT_CHUNK, content_id, seq, data)
                t.content.update(size_bytes=t.content.size_bytes + len(data)).where(
                    t.content.id == content_id).execute()
        return content_id

    def empty_partial_content(self, claim, content_id: int) -> None:
        """Drop every chunk of a download's partial content (the origin sends the whole
        body again), in one transaction, only while ``claim`` holds its lease."""
        with self.writing() as t:
            self._require_lease(claim)
            t.chunk.delete().where(t.chunk.content_id == content_id).execute()
            t.content.update(size_bytes=0).where(t.content.id == content_id).execute()

    def settle_chunked_content(self, row_id: int, hash_type: str, hash_hex: str, content_id: int,
                               size: int) -> int:
        """Make a content stored chunk by chunk addressable by its hash, or drop it for the
        identical content already stored (row ``row_id`` then points to that one);
        returns the content id the version points to. Runs inside the caller's write
        transaction."""
        t = self.tables
        existing = t.content.get_or_none((t.content.hash_type == hash_type) & (t.content.hash_hex == hash_hex))
        if existing is not None and existing.id != content_id:
            t.version.update(content_id=existing.id).where(t.version.id == row_id).execute()
            t.content.delete().where(t.content.id == content_id).execute()
            return existing.id
        t.content.update(hash_hex=hash_hex, size_bytes=size).where(t.content.id == content_id).execute()
        return content_id

    # --- named transitions: pins, tags, collection, listing, maintenance ---
    #
    # Each method runs its statements in one transaction of its own (``writing()`` or
    # ``reading()``), unless its docstring says it runs inside the caller's write
    # transaction. Policy stays with the caller: where a decision must be taken on the
    # rows a transaction reads (what GC removes, whether a version is the one meant),
    # the caller passes it in as a function and the store runs it inside.

    def request_ids(self, identity_key: str | None = None) -> list[int]:
        """The ids of every request, or of the one with ``identity_key`` (empty when none)."""
        with self.reading() as t:
            query = t.request.select(t.request.id)
            if identity_key is not None:
                query = query.where(t.request.identity_key == identity_key)
            return [row[0] for row in query.tuples()]

    def collect_request(self, request_id: int,
                        select: Callable[[Any, list, float], dict]) -> tuple[dict, int]:
        """Collect garbage of one request in one write transaction: read the request and
        all its version records (newest first), let ``select(request, rows, now)`` say
        which to remove (``{version id: (row, reason)}``, see ``_gc_selection``), and remove
        them (see ``collect_versions``). Returns (the removals, bytes freed); nothing is
        removed when the request is gone or ``select`` raises."""
        with self.writing():
            now = self.now()
            request, rows = self.request_and_versions(request_id)
            if request is None:
                return {}, 0
            removals = select(request, rows, now)
            if not removals:
                return {}, 0
            return removals, self.collect_versions(request, removals, now)

    def collect_versions(self, request, removals: dict, now: float) -> int:
        """Delete the version rows ``removals`` names (``{version id: (row, reason)}``) of
        ``request``, remembering the ready ones as removed ("collected", for ``as_of``),
        then the contents they leave unreferenced. Runs inside the caller's write
        transaction; returns the bytes freed."""
        version = self.tables.version
        removed = [row for row, _ in removals.values()]
        self.record_removed(request, [row for row in removed if row.status == "ready"],
                        "collected", now)
        version.delete().where(version.id.in_(list(removals))).execute()
        return self.delete_unreferenced_contents(
            {row.content_id for row in removed if row.content_id is not None})

    def delete_unreferenced_contents(self, content_ids: set) -> int:
        """Delete those of ``content_ids`` no version points to (their chunks follow).
        Runs inside the caller's write transaction; returns the bytes freed."""
        t = self.tables
        freed = 0
        for content_id in content_ids:
            if t.version.select().where(t.version.content_id == content_id).exists():
                continue
            content = t.content.get_or_none(t.content.id == content_id)
            if content is not None:
                freed += content.size_bytes or 0
                t.content.delete().where(t.content.id == content_id).execute()
        return freed

    def prune_removed(self, keep: int, identity_key: str | None = None) -> int:
        """Forget the oldest removed-version records of each identity (or of ``identity_key``)
        beyond the newest ``keep``, among those cached before every ready version of that
        identity (all of them when it has none, e.g. after ``delete``): ``as_of`` at such a
        moment has no ready version to answer with, so it raises NotCachedError with or
        without the record, which only names the removed version. Newer records stay: without
        them ``as_of`` could answer with an older version that was not current then. One
        write transaction; returns how many records were removed."""
        with self.writing() as t:
            removed = t.removed_version
            crowded = removed.select(removed.identity_key).group_by(removed.identity_key).having(
                peewee.fn.COUNT(removed.id) > keep)
            if identity_key is not None:
                crowded = crowded.where(removed.identity_key == identity_key)
            pruned = 0
            for (key,) in list(crowded.tuples()):
                oldest_ready = (t.version.select(peewee.fn.MIN(t.version.cached_unix))
                                .join(t.request, on=(t.version.request_id == t.request.id))
                                .where((t.request.identity_key == key) & (t.version.status == "ready"))
                                .scalar())
                only_named = removed.identity_key == key
                if oldest_ready is not None:
                    only_named &= removed.cached_unix.is_null() | (removed.cached_unix < oldest_ready)
                ids = [row[0] for row in removed.select(removed.id).where(only_named)
                       .order_by(removed.version.desc(), removed.id.desc()).offset(keep).tuples()]
                for start in range(0, len(ids), 500):
                    pruned += removed.delete().where(removed.id.in_(ids[start:start + 500])).execute()
            return pruned

    def request_row(self, identity_key: str):
        """The request row with this identity key (a model instance), or None."""
        with self.reading() as t:
            return t.request.get_or_none(t.request.identity_key == identity_key)

    def request_rows(self, group: str | None = None) -> list:
        """Every request row (of ``group`` when given), oldest first."""
        with self.reading() as t:
            query = t.request.select().order_by(t.request.id)
            if group is not None:
                query = query.where(t.request.group_name == group)
            return list(query)

    def versions_of(self, request_id: int, status: str | None = None) -> list:
        """The version rows of a request (those of ``status`` when given), newest first."""
        with self.reading() as t:
            query = t.version.select().where(t.version.request_id == request_id)
            if status is not None:
                query = query.where(t.version.status == status)
            return list(query.order_by(t.version.version.desc()))

    def counts(self) -> dict:
        """What ``stats()`` counts, read in one go: ``versions`` (status -> rows, as
        stored), ``content_bytes`` and ``unique_contents`` (complete contents),
        ``partial_bytes`` (contents still partial or found corrupted), ``requests``."""
        with self.reading() as t:
            per_status = dict(t.version.select(t.version.status, peewee.fn.COUNT(t.version.id))
                              .group_by(t.version.status).tuples())
            complete = t.content.hash_hex.is_null(False)
            content_bytes, unique = (t.content.select(peewee.fn.COALESCE(peewee.fn.SUM(t.content.size_bytes), 0),
                                                      peewee.fn.COUNT(t.content.id))
                                     .where(complete).tuples().get())
            partial = (t.content.select(peewee.fn.COALESCE(peewee.fn.SUM(t.content.size_bytes), 0))
                       .where(~complete).scalar())
            requests = t.request.select().count()
        return {"versions": per_status, "content_bytes": content_bytes, "unique_contents": unique,
                "partial_bytes": partial, "requests": requests}

    def _checked_version(self, version_id: int, check: Callable[[Any, str | None], None]):
        """(the version row ``version_id``, the URL of its request) once ``check(row or
        None, url or None)`` has accepted them (it raises when the row is not the version
        the caller means). Runs inside the caller's transaction."""
        t = self.tables
        row = t.version.get_or_none(t.version.id == version_id)
        url = None if row is None else (
            t.request.select(t.request.url).where(t.request.id == row.request_id).scalar())
        check(row, url)
        return row, url

    def _answered(self, version_id: int, url: str, answer: Callable[[Any, str, list], Any]):
        """``answer(row, url, ready rows of its request newest first)`` for the version row
        as it is now. Runs inside the caller's transaction, so an answer that fails
        undoes the change made before it."""
        t = self.tables
        row = t.version.get_or_none(t.version.id == version_id)
        return answer(row, url, self.ready_rows(row.request_id))

    def extend_lease(self, row, seconds: float) -> None:
        """Lease the version ``row`` for ``seconds`` from now, never shortening a running
        lease; the new end is mirrored on ``row``. Runs inside the caller's write transaction."""
        version = self.tables.version
        until = self.now() + seconds
        if row.pinned_until_unix is None or row.pinned_until_unix < until:
            version.update(pinned_until_unix=until).where(version.id == row.id).execute()
            row.pinned_until_unix = until

    def pin_version(self, version_id: int, *, lease_sec: float | None, check, answer):
        """Pin a version permanently (``lease_sec`` None) or lease it for ``lease_sec``
        (see ``extend_lease``), in one write transaction; ``check`` and ``answer`` as in
        ``_checked_version`` and ``_answered``. Returns the answer."""
        with self.writing() as t:
            row, url = self._checked_version(version_id, check)
            if lease_sec is None:
                t.version.update(pinned=True).where(t.version.id == row.id).execute()
            else:
                self.extend_lease(row, lease_sec)
            return self._answered(row.id, url, answer)

    def unpin_version(self, version_id: int, *, check, answer):
        """Clear the permanent pin and any lease of a version, in one write transaction."""
        with self.writing() as t:
            row, url = self._checked_version(version_id, check)
            t.version.update(pinned=False, pinned_until_unix=None).where(t.version.id == row.id).execute()
            return self._answered(row.id, url, answer)

    def lease_version(self, version_id: int, lease_sec: float, *, check, answer) -> tuple[Any, Any, float]:
        """Lease a version for ``lease_sec`` (see ``extend_lease``) in one write
        transaction. Returns (the answer, the lease end before, the lease end now), what
        ``end_lease`` needs."""
        with self.writing():
            row, url = self._checked_version(version_id, check)
            before = row.pinned_until_unix
            self.extend_lease(row, lease_sec)
            return self._answered(row.id, url, answer), before, row.pinned_until_unix

    def end_lease(self, version_id: int, before, ours: float) -> None:
        """Put back the lease end ``before`` of a version, unless its lease end is no
        longer ``ours`` (someone extended it meanwhile)."""
        with self.writing() as t:
            t.version.update(pinned_until_unix=before).where(
                (t.version.id == version_id) & (t.version.pinned_until_unix == ours)).execute()

    def add_tag(self, version_id: int, tag: str, *, check, answer):
        """Add ``tag`` to a version's tags unless it is there, in one write transaction."""
        with self.writing() as t:
            row, url = self._checked_version(version_id, check)
            tags = self._stored_tags(row, url)
            if tag not in tags:
                t.version.update(tags=json.dumps(tags + [tag])).where(t.version.id == row.id).execute()
            return self._answered(row.id, url, answer)

    def _stored_tags(self, row, url: str) -> list[str]:
        """The tags stored on a version row; CacheFileError when the disk damaged them
        (then the row is left as it is)."""
        try:
            return _row_tags(row)
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"The tags of version {row.version!r} of {url} in the cache {self.path} are damaged "
                f"and cannot be read ({type(exc).__name__}); delete the version's request to clear them.",
                path=self.path) from exc

    def remove_tag(self, version_id: int, tag: str, *, check, answer):
        """Remove ``tag`` from a version's tags (if there), in one write transaction."""
        with self.writing() as t:
            row, url = self._checked_version(version_id, check)
            tags = [existing for existing in self._stored_tags(row, url) if existing != tag]
            t.version.update(tags=json.dumps(tags)).where(t.version.id == row.id).execute()
            return self._answered(row.id, url, answer)

    def complete_contents(self) -> list[tuple]:
        """(id, hash type, hash, size) of every complete content that is not known to be
        corrupted: what ``verify()`` re-hashes."""
        with self.reading() as t:
            return list(t.content.select(t.content.id, t.content.hash_type, t.content.hash_hex,
                                         t.content.size_bytes)
                        .where(t.content.hash_hex.is_null(False)).tuples())

    def _versions_where(self, condition) -> tuple[list, dict[int, str]]:
        """(the version rows matching ``condition``, by request and version; request id ->
        URL of every request)."""
        with self.reading() as t:
            rows = list(t.version.select().where(condition)
                        .order_by(t.version.request_id, t.version.version))
            urls = dict(t.request.select(t.request.id, t.request.url).tuples())
        return rows, urls

    def ready_versions_holding(self, content_ids: list[int]) -> tuple[list, dict[int, str]]:
        """(the ready version rows holding one of ``content_ids``, request id -> URL)."""
        version = self.tables.version
        return self._versions_where((version.status == "ready") & version.content_id.in_(content_ids))

    def versions_marked_corrupted(self) -> tuple[list, dict[int, str]]:
        """(the failed version rows whose download stats name the corrupted-content error
        (see ``mark_content_corrupted``), request id -> URL)."""
        version = self.tables.version
        return self._versions_where((version.status == "failed")
                                     & version.download_stats.contains(CORRUPTED_ERROR))

    def every_row(self) -> tuple[list, list]:
        """(every request row, every version row), for reading each one back."""
        with self.reading() as t:
            return list(t.request.select()), list(t.version.select())

    def delete_request(self, identity_key: str) -> tuple[int, int]:
        """Delete a request and all its versions in one write transaction, remembering
        its ready versions as removed ("deleted", for ``as_of``), then the contents no
        other version uses. Returns (version rows removed, bytes freed); (0, 0) for an
        unknown request."""
        with self.writing() as t:
            request = self.request_row(identity_key)
            if request is None:
                return 0, 0
            content_ids = {row[0] for row in t.version.select(t.version.content_id).where(
                (t.version.request_id == request.id) & t.version.content_id.is_null(False)).tuples()}
            self.record_removed(request, list(t.version.select().where(
                (t.version.request_id == request.id) & (t.version.status == "ready"))), "deleted", self.now())
            removed = t.version.delete().where(t.version.request_id == request.id).execute()
            t.request.delete().where(t.request.id == request.id).execute()
            return removed, self.delete_unreferenced_contents(content_ids)

    def content_size_and_hash_type(self, content_id: int) -> tuple[int | None, str | None]:
        """(size, hash type) of a content; (None, None) when it is gone."""
        with self.reading() as t:
            return t.content.select(t.content.size_bytes, t.content.hash_type).where(
                t.content.id == content_id).tuples().first() or (None, None)

    def import_version(self, source: "_Store", request_columns: dict, version_columns: dict,
                       source_content_id: int) -> tuple[bool, str]:
        """Add one ready version of ``source`` (another cache) to this one, in one write
        transaction: its request (``request_columns``) unless one with that identity is
        here, then a ready version row with ``version_columns`` (its version string, hash,
        pins, tags, times...) and its content: the one this cache holds with that hash, or
        a copy of ``source_content_id`` (see ``copy_content_from``; _ContentMismatch undoes
        everything). Nothing is added when the request here already has that version
        string or is hashed with another type. Returns (whether the version was added,
        the hash type of the request here)."""
        with self.writing() as t:
            target = self.request_row(request_columns["identity_key"])
            if target is None:
                request_id = t.request.insert(**request_columns).execute()
                hash_type = request_columns["validation_hash_type"]
            else:
                request_id, hash_type = target.id, target.validation_hash_type
                if hash_type != request_columns["validation_hash_type"]:
                    return False, hash_type
            if t.version.select().where((t.version.request_id == request_id)
                                        & (t.version.version == version_columns["version"])).exists():
                return False, hash_type
            hash_hex = version_columns["content_hash_hex"]
            content = t.content.get_or_none((t.content.hash_type == hash_type)
                                            & (t.content.hash_hex == hash_hex))
            content_id = content.id if content is not None else self.copy_content_from(
                source, source_content_id, hash_type, hash_hex)
            t.version.insert(request_id=request_id, content_id=content_id, status="ready",
                             **version_columns).execute()
            return True, hash_type

    def copy_content_from(self, source: "_Store", source_content_id: int, hash_type: str,
                          hash_hex: str) -> int:
        """Copy a content chunk by chunk from ``source`` into this cache, checking its hash
        (_ContentMismatch when it differs). Runs inside the caller's write transaction;
        returns the new content id."""
        t = self.tables
        content_id = t.content.insert(hash_type=hash_type, hash_hex=None, size_bytes=0).execute()
        hasher, size = hashlib.new(hash_type), 0
        for seq, data in enumerate(source.iter_chunks(source_content_id)):
            hasher.update(data)
            size += len(data)
            t.chunk.insert(content_id=content_id, seq=seq, data=data).execute()
        if hasher.hexdigest() != hash_hex:
            raise _ContentMismatch(f"its content hashes to {hasher.hexdigest()}, not {hash_hex}")
        t.content.update(hash_hex=hash_hex, size_bytes=size).where(t.content.id == content_id).execute()
        return content_id

    def keep_requests(self, requests: list, keep: dict[int, str | None]) -> None:
        """For a private copy, in one write transaction: delete every request of
        ``requests`` (its rows) that ``keep`` does not name, with its versions; of each
        request ``keep`` maps to a content hash, every version but the ready ones with
        that hash (the ready ones remembered as removed, "not locked", so ``as_of`` in
        the copy never answers with an older version than the one current then); then
        every content no version uses."""
        dropped = [row.id for row in requests if row.id not in keep]
        by_id = {row.id: row for row in requests}
        with self.writing() as t:
            now = self.now()
            for start in range(0, len(dropped), 500):
                batch = dropped[start:start + 500]
                t.version.delete().where(t.version.request_id.in_(batch)).execute()
                t.request.delete().where(t.request.id.in_(batch)).execute()
            for request_id, digest in keep.items():
                if digest is not None:
                    unlocked = (t.version.request_id == request_id) & (
                        (t.version.status != "ready") | (t.version.content_hash_hex != digest))
                    self.record_removed(by_id[request_id], list(t.version.select().where(
                        unlocked & (t.version.status == "ready"))), "not locked", now)
                    t.version.delete().where(unlocked).execute()
            used = t.version.select(t.version.content_id).where(t.version.content_id.is_null(False))
            t.content.delete().where(t.content.id.not_in(used)).execute()  # chunks follow (cascade)

    def replace_salt(self, salt: bytes) -> None:
        """Make ``salt`` this cache's salt, in one write transaction (a copy of another
        cache takes its salt, so the sensitive values digested there still match)."""
        with self.writing() as t:
            t.meta.update(value=salt.hex()).where(t.meta.key == "salt").execute()
        self.salt = salt


class _SqliteStore(_Store):
    """A cache in one SQLite file: WAL, one writer at a time (``BEGIN IMMEDIATE``), the
    file's own marks (``application_id``, ``user_version``), read-only opening."""

    noun = "cache file"

    def __init__(self, path: pathlib.Path, *, read_only: bool = False):
        self.path = path
        _sqlite_check_header(path)
        # Read-only: asked for, or the file cannot be written by this process.
        self.read_only = read_only or _sqlite_is_read_only(path)
        self.access = _sqlite_read_only_access(path) if self.read_only else None
        # A read-only WAL reader must create -wal/-shm when no one has the file open;
        # close() then has them removed again (see _remove_reader_side_files).
        self._makes_side_files = self.access == "ro" and not any(
            os.path.lexists(str(path) + suffix) for suffix in ("-wal", "-shm"))
        if self.read_only and not path.is_file():
            raise CacheFileError(f"The read-only cache file {path} does not exist.", path=path)
        try:
            if not self.read_only:
                path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheFileError(f"Cannot create the directory of the cache file {path}: {exc}.",
                                 path=path) from exc
        self._start()

    def _new_database(self) -> peewee.Database:
        return _sqlite_database(self.path, self.access)

    def _write_transaction(self):
        return _sqlite_write_transaction(self.db)

    def close(self) -> None:
        super().close()
        if self._makes_side_files:
            _remove_reader_side_files(self.path)

    def _schema_marks(self) -> tuple[bool, int]:
        application_id, user_version, tables = _sqlite_file_marks(self.db)
        return application_id != APPLICATION_ID and (application_id != 0 or tables > 0), user_version

    def _prepare_new(self) -> None:
        _sqlite_prepare_new_file(self.db)

    def _mark_schema(self, version: int) -> None:
        _sqlite_mark_file(self.db, version)

    def change_stamp(self) -> int:
        return _sqlite_change_counter(self.db)

    def _read_request_and_ready(self, identity_key: str) -> tuple[Any, Any, list]:
        rows = self._run(_SQL_STAMPED_REQUEST_AND_READY, identity_key).fetchall()
        # One row at least (the stamp's), with empty request columns when there is no request.
        return rows[0][0], rows[0][0], [row[1:] for row in rows if row[1] is not None]

    def structural_problems(self) -> list[str]:
        """``PRAGMA integrity_check`` and ``foreign_key_check``, as sentences."""
        problems = []
        try:
            with self.reading():
                lines = [row[0] for row in self.db.execute_sql(
                    f"PRAGMA integrity_check({INTEGRITY_CHECK_MAX_LINES})").fetchall()]
        except CacheFileError as exc:
            lines = [f"the check could not complete ({exc.__cause__ or exc})"]
        if lines != ["ok"]:
            problems += [f"SQLite integrity check of {self.path}: {line}" for line in lines]
        try:
            with self.reading():
                missing = self.db.execute_sql("PRAGMA foreign_key_check").fetchall()
        except CacheFileError as exc:
            problems.append(f"SQLite foreign key check of {self.path} could not complete "
                            f"({exc.__cause__ or exc}).")
            missing = []
        for table, rowid, parent, _ in missing:
            problems.append(f"SQLite foreign key check of {self.path}: row {rowid} of table {table} "
                            f"refers to a missing row of {parent}.")
        return problems

    def database_version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}"

    def extra_stats(self) -> dict:
        return {"sqlite_version": sqlite3.sqlite_version}

    def give_back_free_pages(self, *, checkpoint: bool) -> None:
        with self.reading():  # (translates sqlite3 errors from executescript too)
            _sqlite_give_back_free_pages(self.db, checkpoint=checkpoint)

    def file_size(self) -> int:
        """Bytes on disk: the main file plus its write-ahead log."""
        total = 0
        for path in (self.path, pathlib.Path(str(self.path) + "-wal")):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total


# --- PostgreSQL specifics ----------------------------------------------------------


#: Schemes of a cache location that names a PostgreSQL database.
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})
#: The schema a PostgreSQL cache lives in unless its URL says ``?schema=NAME``.
DEFAULT_POSTGRES_SCHEMA = "buffylite"
#: Schema names buffylite accepts: what PostgreSQL takes unquoted, lower case.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: Seconds to wait for a connection to the server unless the URL says ``connect_timeout``.
POSTGRES_CONNECT_TIMEOUT_SEC = 10
#: A write transaction's first statement: wait for the cache's write lock (writers take
#: turns, as in SQLite), then read the server's clock.
_PG_LOCK_AND_CLOCK = "SELECT pg_advisory_xact_lock(%s), extract(epoch FROM clock_timestamp())::float8"
_PG_CLOCK = "SELECT extract(epoch FROM clock_timestamp())::float8"
#: Connections of a parent process, kept from being finalised in a forked child: closing
#: them there would end the parent's sessions on the server.
_INHERITED_DATABASES: list = []


def _is_postgres_location(location) -> bool:
    match = _URL_LOCATION.match(location) if isinstance(location, str) else None
    return match is not None and match.group(1).lower() in _POSTGRES_SCHEMES


def _postgres_location(location: str) -> tuple[str, str, str, list[str]]:
    """(the URL for the driver, the schema name, the URL as messages show it, the
    password in the forms it can take in a message) of a PostgreSQL cache location.
    ``?schema=NAME`` is buffylite's; every other parameter goes to the driver."""
    shown = _masked_location(location)
    try:
        parts = urllib.parse.urlsplit(location)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError as exc:
        raise InvalidRequestError(f"The cache location {shown} is not a valid PostgreSQL URL: {exc}.") from None
    if not parts.hostname and not parts.path.strip("/"):
        raise InvalidRequestError(f"The cache location {shown} names no PostgreSQL host or database.")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in query if name == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_POSTGRES_SCHEMA
    if not _SCHEMA_NAME.fullmatch(schema):
        raise InvalidRequestError(f"The schema {schema!r} of {shown} is not a valid schema name: use "
                                  "lower-case letters, digits and _ (up to 63, not starting with a digit).")
    rest = [(name, value) for name, value in query if name != "schema"]
    if not any(name == "connect_timeout" for name, _ in rest):
        rest.append(("connect_timeout", str(POSTGRES_CONNECT_TIMEOUT_SEC)))
    url = urllib.parse.urlunsplit(("postgresql", parts.netloc, parts.path, urllib.parse.urlencode(rest), ""))
    password = parts.password or ""
    # (A password of one or two characters is not scrubbed from driver messages: replacing
    # every such letter would garble them; none of the driver's messages quotes it anyway.)
    secrets_in_text = sorted({secret for secret in (password, urllib.parse.unquote(password),
                                                   urllib.parse.quote(password, safe=""))
                              if len(secret) >= 3}, key=len, reverse=True)
    return url, schema, shown, secrets_in_text


def _postgres_database_class(shown: str) -> tuple[type, dict]:
    """peewee's database class for psycopg 3 (and the arguments it needs), with the
    connection tracking of ``_ClosingAll``; CacheFileError naming the extra when the
    driver is not installed."""
    if _optional_extra("psycopg") is None:
        raise CacheFileError(f"The cache {shown} is a PostgreSQL database, which needs the psycopg driver: "
                             "install buffylite[postgres] (pip install 'buffylite[postgres]').", path=shown)
    try:  # peewee 3.17 has psycopg 3 in playhouse; later releases in PostgresqlDatabase
        from playhouse.psycopg3_ext import Psycopg3Database as base  # noqa: PLC0415
        options = {}
    except ImportError:
        base, options = peewee.PostgresqlDatabase, {"prefer_psycopg3": True}
    return type("_PostgresDatabase", (_ClosingAll, base), {"__module__": __name__}), options


class _PostgresStore(_Store):
    """A cache in one schema of a PostgreSQL database, shared by every process and
    machine that reaches the server.

    Writers take turns: every write transaction starts by taking a transaction-scoped
    advisory lock of the schema, so a claim and its decision are one step across
    machines, as with SQLite's single writer. That statement also reads the server's
    clock; ``now()`` is that reading moved on by this process's monotonic clock, so every
    time stored (version strings, leases, pins, freshness, backoff) comes from the
    server, whatever the client machines' clocks say. Content chunks are ``bytea`` rows."""

    is_file = False

    def __init__(self, location: str, *, read_only: bool = False):
        self._url, self.schema_name, self.path, self._secrets = _postgres_location(location)
        self.read_only = bool(read_only)
        self._database_class, self._driver_options = _postgres_database_class(self.path)
        import psycopg  # noqa: PLC0415 - present: checked just above
        self.driver_errors = (peewee.DatabaseError, peewee.InterfaceError, psycopg.Error)
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"buffylite {self.schema_name}".encode()).digest()[:8], "big", signed=True)
        self._driver_sql: dict[str, str] = {}
        self._clock = (time.time(), time.monotonic())
        self._start()

    def _new_database(self) -> peewee.Database:
        import psycopg.conninfo  # noqa: PLC0415 - present: checked in __init__
        # The URL as libpq reads it, as keywords (peewee releases pass a URL on differently).
        parameters = psycopg.conninfo.conninfo_to_dict(self._url)
        return self._database_class(parameters.pop("dbname", None) or "", **parameters,
                                    options=f"-c search_path={self.schema_name}",
                                    application_name="buffylite", **self._driver_options)

    def _open_database(self) -> None:
        super()._open_database()
        with self._translated():
            started = time.monotonic()
            epoch = self.db.connection().execute(_PG_CLOCK).fetchone()[0]
            self._clock = (epoch, (started + time.monotonic()) / 2)

    def _forget_inherited_connections(self) -> None:
        _INHERITED_DATABASES.append(self.db)

    def drop_broken_connection(self) -> None:
        state = self.db._state
        if state.conn is not None and (state.conn.closed or getattr(state.conn, "broken", False)):
            with contextlib.suppress(Exception):
                state.conn.close()
            state.reset()

    def masked(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _run(self, sql: str, *values):
        """Like the base's, with the SQL's ``?`` placeholders as psycopg's ``%s``."""
        text = self._driver_sql.get(sql)
        if text is None:
            text = self._driver_sql[sql] = sql.replace("?", "%s")
        return self.execute_on(self.db.connection(), text, values)

    @staticmethod
    def execute_on(connection, sql: str, values):
        """Results in binary form: a ``bytea`` chunk then arrives as its bytes, not as
        hex text of twice the size that both ends must encode and decode."""
        return connection.execute(sql, values, binary=True)

    def _read_request_and_ready(self, identity_key: str) -> tuple[Any, Any, list]:
        # No cheap change counter: the rows are always read, and the stored sensitive
        # names come along (as ``_names_stamp`` writes them) to tell whether they changed.
        rows = self._run(_SQL_NAMED_REQUEST_AND_READY, identity_key).fetchall()
        return rows[0][0], None, [row[1:] for row in rows if row[1] is not None]

    def _names_stamp(self, stored: dict, change_stamp) -> str:
        return ";".join(f"{key}={value}" for key, value in sorted(stored.items()))

    def _inserted_id(self, sql: str, values) -> int | None:
        text = self._statement(("returning id", sql), lambda: sql + ' RETURNING "id"')
        row = self._run(text, *values).fetchone()
        return row[0] if row is not None else None

    @contextlib.contextmanager
    def _write_transaction(self):
        with self.db.atomic():
            epoch = self.db.connection().execute(_PG_LOCK_AND_CLOCK, (self._lock_key,)).fetchone()[1]
            self._clock = (epoch, time.monotonic())
            yield

    def now(self) -> float:
        epoch, read_at = self._clock
        return epoch + (time.monotonic() - read_at)

    def begin_snapshot(self, database: peewee.Database) -> None:
        database.execute_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _schema_marks(self) -> tuple[bool, int]:
        tables, has_meta = self.db.connection().execute(
            "SELECT count(*), count(*) FILTER (WHERE tablename = 'meta') FROM pg_tables WHERE schemaname = %s",
            (self.schema_name,)).fetchone()
        if not has_meta:
            return tables > 0, 0
        row = self.db.connection().execute(
            """SELECT "value" FROM "meta" WHERE "key" = 'schema_version'""").fetchone()
        try:
            return row is None, int(row[0]) if row is not None else 0
        except ValueError:
            return True, 0

    def _upgrade_schema(self) -> None:
        if self.read_only and self._schema_marks() == (False, 0):
            raise CacheFileError(f"The read-only cache {self.path} does not exist (the schema "
                                 f"{self.schema_name} holds no tables).", path=self.path)
        super()._upgrade_schema()

    def _prepare_new(self) -> None:
        with self._write_transaction():
            self.db.connection().execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema_name}"')

    def prepare_chunk_table(self) -> None:
        """Chunks are stored compressed with lz4 where the server has it: on content that
        is already compressed (most downloads) it costs nothing, on text it saves about
        two thirds of the disk and WAL at no cost in speed; the default, pglz, writes text
        four times slower. A server without lz4 (before PostgreSQL 14, or built without
        it) stores chunks uncompressed instead (bench/pg_toast.py has the numbers)."""
        for setting in ('ALTER TABLE "chunk" ALTER COLUMN "data" SET COMPRESSION lz4',
                        'ALTER TABLE "chunk" ALTER COLUMN "data" SET STORAGE EXTERNAL'):
            try:
                with self.db.atomic():  # a savepoint: a refused setting spoils nothing
                    self.db.execute_sql(setting)
                return
            except peewee.DatabaseError as exc:
                log.debug("%s: %s", setting, exc)

    def _mark_schema(self, version: int) -> None:
        meta = self.tables.meta
        meta.insert(key="schema_version", value=str(int(version))).on_conflict(
            conflict_target=[meta.key], update={meta.value: str(int(version))}).execute()

    def give_back_free_pages(self, *, checkpoint: bool) -> None:
        """At the end of gc(): VACUUM the tables, so the space of removed chunks is
        reused at once (autovacuum would get there later). Skipped when another session
        is vacuuming them."""
        if not checkpoint:
            return
        try:
            with self.reading():
                self.db.connection().execute('VACUUM (SKIP_LOCKED) "chunk", "content", "version"')
        except CacheFileError as exc:
            log.debug("VACUUM of %s did not run: %s", self.path, exc)

    def database_version(self) -> str:
        with self.reading():
            return "PostgreSQL " + self.db.connection().execute("SHOW server_version").fetchone()[0]

    def extra_stats(self) -> dict:
        return {"schema": self.schema_name}

    def file_size(self) -> int:
        """Bytes of the schema's tables, with their indexes and TOAST data."""
        with self.reading():
            return int(self.db.connection().execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                (self.schema_name,)).fetchone()[0])


def _open_store(location, *, read_only: bool = False) -> _Store:
    """The store for a cache location: a PostgreSQL URL or the path of an SQLite file."""
    if _is_postgres_location(location):
        return _PostgresStore(location, read_only=read_only)
    return _SqliteStore(pathlib.Path(location), read_only=read_only)


class _DriverErrors:
    """Context manager turning sqlite3/peewee errors into CacheFileError naming the file.
    A class rather than a generator: it runs twice on every cache hit."""

    __slots__ = ("_store",)

    def __init__(self, store: _Store):
        self._store = store

    def __enter__(self) -> _Tables:
        return self._store.tables

    def __exit__(self, kind, exc, traceback) -> bool:
        if kind is not None and issubclass(kind, self._store.driver_errors):
            self._store.drop_broken_connection()
            path, noun = self._store.path, self._store.noun
            if _is_out_of_space(exc):
                raise CacheFileError(f"The {noun} {path} cannot be written: the disk is full.",
                                     path=path) from exc
            raise CacheFileError(f"The {noun} {path} cannot be used: {self._store.masked(str(exc))}.",
                                 path=path) from exc
        return False


class _ContentStream(io.RawIOBase):
    """A read-only, seekable binary stream over a content's chunks.

    It runs on a connection of its own inside a read transaction opened at creation,
    so it reads one consistent snapshot: deleting the version elsewhere does not
    affect it. At creation it reads the chunk layout (sequence numbers and lengths,
    not the bytes) and checks that the lengths add up to the stored size
    (IntegrityError otherwise); then it holds at most one chunk in memory and
    fetches the chunk under the position on demand, so ``seek`` anywhere is cheap.
    With ``check_hash`` the bytes are hashed as they are served in order from the
    start; the read that reaches the end raises IntegrityError instead of returning
    its bytes when the digest differs, and the content is marked corrupted. Close it
    (or use ``with``) to release the snapshot, which otherwise keeps the WAL from
    being checkpointed.
    """

    def __init__(self, store: _Store, content_id: int, *, check_hash: str | None = None):
        super().__init__()
        self._store = store
        self._content_id = content_id
        self._statements = store.content_statements()
        self._db = store._new_database()
        self._db.connect()
        store.begin_snapshot(self._db)
        try:
            self._load_layout(check_hash)
        except BaseException:
            self.close()
            raise
        self._position = 0
        self._chunk_index = -1
        self._chunk = memoryview(b"")

    def _run(self, name: str, *values):
        sql, template = self._statements[name]
        supplied = iter(values)
        return self._store.execute_on(self._db.connection(),
                                      sql, [next(supplied) if param == _SLOT else param for param in template])

    def _load_layout(self, check_hash: str | None) -> None:
        # The first read pins the snapshot; the content must be in it.
        head = self._run("head", self._content_id).fetchone()
        if head is None:
            raise NotCachedError(f"This version's content is no longer in the cache {self._store.path} "
                                 "(the version was deleted or collected).")
        hash_type, self._stored_hash, size = head
        self._seqs: list[int] = []
        self._starts: list[int] = []  # offset of each chunk's first byte
        total = 0
        for seq, length in self._run("layout", self._content_id):
            self._seqs.append(seq)
            self._starts.append(total)
            total += length or 0
        if total != size:
            raise IntegrityError(f"Content {self._stored_hash or self._content_id} in {self._store.path} "
                                 f"holds {total} bytes but its stored size is {size}: chunks are "
                                 "missing or damaged.")
        self._size = total
        self._check_hash = check_hash
        self._hasher = hashlib.new(hash_type) if check_hash else None
        self._hashed_to = 0

    # --- io.RawIOBase ---

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._require_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset`` bytes from the start (SEEK_SET), the position (SEEK_CUR)
        or the end (SEEK_END), as ``io.BytesIO`` does: a negative SEEK_SET offset is a
        ValueError, a relative seek before the start stops at 0, a position past the
        end reads as empty."""
        self._require_open()
        # InvalidRequestError is a ValueError too, what io's own streams raise here.
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise InvalidRequestError(f"Seek offset must be an integer, not {type(offset).__name__}.")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise InvalidRequestError(f"Invalid whence ({whence!r}): use SEEK_SET, SEEK_CUR or SEEK_END.")
        if whence == io.SEEK_SET and offset < 0:
            raise InvalidRequestError(f"Negative seek position {offset}.")
        self._position = max(base + offset, 0)
        return self._position

    def read(self, size: int = -1) -> bytes:
        self._require_open()
        if size is None or size < 0:
            size = max(self._size - self._position, 0)
        pieces = []
        while size > 0 and self._position < self._size:
            piece = self._piece_at(self._position, size)
            pieces.append(piece)
            self._position += len(piece)
            size -= len(piece)
        # A read of exactly one whole chunk (what chunk-sized reads are) hands out the
        # chunk's own bytes: no copy.
        data = pieces[0] if len(pieces) == 1 and isinstance(pieces[0], bytes) else b"".join(pieces)
        self._hash_served(self._position - len(data), data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._db.rollback()
            with contextlib.suppress(Exception):
                self._db.close()
            self._chunk = memoryview(b"")
        super().close()

    # --- chunks ---

    def _require_open(self) -> None:
        if self.closed:
            raise InvalidRequestError("I/O operation on a closed buffylite stream.")

    def _piece_at(self, position: int, size: int) -> memoryview | bytes:
        """Up to ``size`` bytes from ``position`` (inside the content), within one chunk
        (the chunk's bytes themselves when that is all of it)."""
        index = bisect.bisect_right(self._starts, position) - 1
        if index != self._chunk_index:
            with self._store._translated():
                row = self._run("chunk", self._content_id, self._seqs[index]).fetchone()
            if row is not None and not isinstance(row[0], (bytes, bytearray, memoryview)):
                # A damaged file can hold a chunk of another SQLite type (TEXT, a number).
                raise IntegrityError(f"Content {self._stored_hash or self._content_id} in {self._store.path} "
                                     f"is damaged: chunk {self._seqs[index]} is not bytes "
                                     f"({type(row[0]).__name__}).")
            self._chunk = memoryview(bytes(row[0])) if row is not None else memoryview(b"")
            self._chunk_index = index
            expected = (self._starts[index + 1] if index + 1 < len(self._starts) else self._size) \
                - self._starts[index]
            if len(self._chunk) != expected:
                raise IntegrityError(f"A chunk of content {self._stored_hash or self._content_id} in "
                                     f"{self._store.path} changed size while being read.")
        start = position - self._starts[index]
        if start == 0 and size >= len(self._chunk):
            return self._chunk.obj
        return self._chunk[start:start + size]

    def _hash_served(self, start: int, data: bytes) -> None:
        """Feed the hash with the bytes served in order from the start; check it at the end."""
        if self._hasher is None or not start <= self._hashed_to <= start + len(data):
            return
        self._hasher.update(memoryview(data)[self._hashed_to - start:])
        self._hashed_to = start + len(data)
        if self._hashed_to < self._size:
            return
        digest, self._hasher = self._hasher.hexdigest(), None
        if digest != self._check_hash:
            marked = "The version is now marked failed."
            if self._store.read_only:  # the damage is reported all the same
                marked = "The cache is read-only: the version cannot be marked failed."
            else:
                self._store.mark_content_corrupted(self._content_id, self._check_hash)
            raise IntegrityError(f"Content {self._check_hash} in {self._store.path} is corrupted: its "
                                 f"bytes hash to {digest}. {marked}")


# ---------------------------------------------------------------------------
# HTTP: pool, proxies, one attempt, retry timing
# ---------------------------------------------------------------------------


#: A Content-Length buffylite believes: ASCII digits, at most 18 of them (fits SQLite's integers).
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
#: ``Content-Range: bytes START-END/TOTAL`` (TOTAL may be ``*``), ASCII digits only.
_CONTENT_RANGE = re.compile(r"bytes\s+([0-9]{1,18})-[0-9]{1,18}/([0-9]{1,18}|\*)", re.IGNORECASE)


class _AttemptError(Exception):
    """One download attempt failed. ``retryable`` says whether another attempt may help;
    ``retry_after`` is the origin's requested pause in seconds (or None)."""

    def __init__(self, message: str, *, status_code: int | None = None, retryable: bool,
                 retry_after: float | None = None, cause: object = None):
        super().__init__(message)
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after
        self.cause = cause


#: urllib3 follows redirects (stripping credentials when scheme, host or port change,
#: its default ``remove_headers_on_redirect``); every other retry is ours, so that
#: Retry-After, max_retry_wait, resume and the download lease stay under our control.
_URLLIB3_RETRY = Retry(total=None, connect=0, read=0, redirect=MAX_REDIRECTS, status=0, other=0,
                       raise_on_redirect=True, raise_on_status=False,
                       # urllib3 < 2.2.2 keeps Proxy-Authorization on a cross-origin redirect.
                       remove_headers_on_redirect=Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT
                       | {"Proxy-Authorization"})


class _HttpClient:
    """One PoolManager per Cache, plus a ProxyManager per proxy named by the environment
    (``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``, read as pip and requests do)."""

    def __init__(self, timeout: float | urllib3.Timeout, user_agent: str):
        self.timeout = timeout if isinstance(timeout, urllib3.Timeout) else urllib3.Timeout(
            connect=timeout, read=timeout)
        self.user_agent = user_agent
        self._pid = os.getpid()
        self._direct = urllib3.PoolManager()
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._proxy_passwords: set[str] = set()  # masked in every message
        self._lock = threading.Lock()

    def _manager_for(self, url: str) -> urllib3.PoolManager:
        if os.getpid() != self._pid:  # After fork: never share sockets with the parent.
            self._pid, self._direct, self._proxied = os.getpid(), urllib3.PoolManager(), {}
        parsed = urllib3.util.parse_url(url)
        proxy = _proxy_for(parsed.scheme)
        if not proxy or _bypasses_proxy(parsed.host or ""):
            return self._direct
        with self._lock:
            if proxy not in self._proxied:
                # Credentials in the proxy URL (http://user:pass@proxy:3128) become
                # Proxy-Authorization, as pip and requests do.
                auth = urllib3.util.parse_url(proxy).auth
                proxy_headers = urllib3.make_headers(
                    proxy_basic_auth=urllib.parse.unquote(auth)) if auth else None
                if auth and ":" in auth:
                    password = auth.partition(":")[2]
                    self._proxy_passwords |= {password, urllib.parse.unquote(password)} - {""}
                self._proxied[proxy] = urllib3.ProxyManager(proxy, proxy_headers=proxy_headers)
            return self._proxied[proxy]

    def send(self, method: str, url: str, headers: dict, body: bytes | None, *,
             timeout: urllib3.Timeout | None = None,
             strip_on_redirect: frozenset = frozenset()) -> urllib3.BaseHTTPResponse:
        """Send one request; the body is left unread. Raises _AttemptError.

        ``timeout`` overrides the Cache's for this request.
        ``strip_on_redirect``: header names (lower-case) never sent to another origin
        (scheme, host or port differ) on a redirect, beyond urllib3's Authorization,
        Cookie and Proxy-Authorization.
        """
        try:
            return self._send(method, url, headers, body, timeout, strip_on_redirect)
        except _AttemptError as error:
            if not self._proxy_passwords:
                raise
            # A proxy URL with its password may be quoted by the error: mask it.
            message, cause = str(error), str(error.cause) if error.cause is not None else None
            for password in self._proxy_passwords:
                message = message.replace(password, MASK)
                cause = cause.replace(password, MASK) if cause is not None else None
            raise _AttemptError(message, status_code=error.status_code, retryable=error.retryable,
                                retry_after=error.retry_after, cause=cause) from None

    def _send(self, method: str, url: str, headers: dict, body: bytes | None,
              timeout: urllib3.Timeout | None, strip_on_redirect: frozenset) -> urllib3.BaseHTTPResponse:
        if not any(name.lower() == "user-agent" for name in headers):
            headers = {**headers, "User-Agent": self.user_agent}
        retries = _URLLIB3_RETRY
        if strip_on_redirect:
            retries = retries.new(remove_headers_on_redirect=set(Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT)
                                  | set(strip_on_redirect))
        try:
            return self._manager_for(url).request(
                method.upper(), url, headers=headers, body=body, retries=retries,
                timeout=timeout or self.timeout, preload_content=False, redirect=True)
        except urllib3.exceptions.MaxRetryError as exc:
            reason = exc.reason
            if isinstance(reason, urllib3.exceptions.ResponseError):
                raise _AttemptError(f"more than {MAX_REDIRECTS} redirects (a redirect loop?)",
                                    retryable=False, cause=exc) from exc
            if isinstance(reason, urllib3.exceptions.SSLError):
                raise _AttemptError(f"TLS error: {reason}", retryable=False, cause=exc) from exc
            raise _AttemptError(f"cannot connect: {reason}", retryable=True, cause=exc) from exc
        except urllib3.exceptions.LocationValueError as exc:
            raise _AttemptError(f"bad redirect location: {exc}", retryable=False, cause=exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _AttemptError(f"request failed: {exc}", retryable=True, cause=exc) from exc
        except (ValueError, TypeError, LookupError, UnicodeError, OverflowError) as exc:
            # What an origin can make the HTTP stack choke on (a malformed Location, an
            # odd status line or header): the download fails, the cache stays as it is.
            raise _AttemptError(f"the origin's answer cannot be used: {exc}", retryable=False,
                                cause=exc) from exc

    def close(self) -> None:
        self._direct.clear()
        with self._lock:
            for manager in self._proxied.values():
                manager.clear()
            self._proxied.clear()


def _read_available(response: urllib3.BaseHTTPResponse, amount: int) -> bytes:
    """Up to ``amount`` bytes of the body, as soon as some have arrived (``read1``). urllib3
    2.0 has no ``read1``; there ``read(amount)`` is used, which waits for ``amount`` bytes
    (or the end), so progress and stall detection are coarser but the bytes the same."""
    read1 = getattr(response, "read1", None)
    return read1(amount) if read1 is not None else response.read(amount)


def _proxy_for(scheme: str) -> str | None:
    """The proxy the environment names for ``scheme`` (else for "all"), as the standard
    library's ``getproxies()`` finds it: ``<scheme>_proxy`` before ``<SCHEME>_PROXY``, an
    empty lower-case one meaning none, ``HTTP_PROXY`` ignored under CGI. On Linux it looks
    up those few names instead of scanning the whole environment on every request; macOS
    and Windows also have system settings, which ``getproxies()`` reads."""
    if sys.platform in ("darwin", "win32"):
        import urllib.request  # noqa: PLC0415 - see the imports note
        proxies = urllib.request.getproxies()
        return proxies.get(scheme) or proxies.get("all")
    environ = os.environ
    for name in (scheme, "all"):
        lower = environ.get(f"{name}_proxy")
        if lower is not None:
            if lower:
                return lower
            continue
        upper = environ.get(f"{name.upper()}_PROXY")
        if upper and not (name == "http" and "REQUEST_METHOD" in environ):
            return upper
    return None


def _bypasses_proxy(host: str) -> bool:
    """Does ``NO_PROXY`` exempt ``host``? The standard library's rules (names, domain
    suffixes, ``*``), plus address ranges such as ``10.0.0.0/8`` as requests allows."""
    import urllib.request  # noqa: PLC0415 - see the imports note
    if urllib.request.proxy_bypass(host):
        return True
    no_proxy = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    for entry in no_proxy.replace(" ", "").split(","):
        if "/" in entry:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
    return False


def _retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After (delta-seconds or HTTP-date) -> seconds to wait from ``now``, or None
    when absent or unparsable. The real wait, however long: urllib3's parser silently
    caps it at six hours, which would misreport a date years ahead (capped at
    MAX_BACKOFF_SEC only so that it stays a finite, storable number)."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # Compared as text first: int() of thousands of digits is slow or refused.
        return float(int(text)) if len(text) <= 12 else MAX_BACKOFF_SEC
    moment = _parse_http_date(text)
    if moment is None:
        return None
    return min(MAX_BACKOFF_SEC, max(0.0, moment - (_now() if now is None else now)))


def _backoff_seconds(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter for retry number ``attempt`` (0-based), at most ``cap``."""
    return min(cap, BACKOFF_BASE_SEC * (2 ** attempt) * random.uniform(0.75, 1.25))


def _is_resumable(headers) -> bool:
    """An interrupted body can continue with Range + If-Range: the origin accepts byte
    ranges, names a validator If-Range can use, and sent no Content-Encoding (ranges
    count encoded bytes, the content we hash is decoded)."""
    if headers.get("Accept-Ranges", "").lower() != "bytes" or headers.get("Content-Encoding"):
        return False
    etag = headers.get("ETag") or ""
    return bool(etag and not etag.startswith("W/")) or bool(headers.get("Last-Modified"))


def _has_excess_body(response: urllib3.BaseHTTPResponse, remaining: int) -> bool:
    """Best effort, called before the last ``remaining`` bytes of a body are read: did
    the origin send more than its Content-Length? http.client stops reading at the
    declared length, so the surplus is looked for where it waits: in the connection's
    read buffer beyond ``remaining``, or on the socket right after it."""
    try:
        buffered = response._fp.fp  # the BufferedReader http.client reads from
        waiting = len(buffered.peek(remaining))
        if waiting > remaining:
            return True
        if waiting < remaining:
            return False  # The rest of the body is still in flight: cannot tell.
        sock = response.connection.sock
        if not select.select([sock], [], [], 0)[0]:
            return False
        return bool(sock.recv(1, socket.MSG_PEEK))
    except Exception:  # noqa: BLE001 - a best-effort probe must never break a download
        return False


# ---------------------------------------------------------------------------
# Content as files: materialised files and unpacked archives
# ---------------------------------------------------------------------------
#
# The bookkeeping is the file system, keyed by content hash, so no table is needed
# and any process finds what another one made:
#
#   <cache file>.files/<hash type>-<hash>/<file name>   read-only copy of one content
#   <cache file>.files/<hash type>-<hash>/.lock         held while a copy is written
#   <cache file>.unpacked/<hash type>-<hash>/           one unpacked archive
#   <cache file>.unpacked/.lock-<hash type>-<hash>      held while it is unpacked
#
# Everything is written under a ".tmp-" name and renamed (or hard-linked) into
# place, so a name that exists is complete. Another version with the same content
# but another file name gets a hard link to the same file. gc() removes the entries
# whose content is no longer stored, and ".tmp-" leftovers of dead processes.

_TEMP_PREFIX = ".tmp-"


def _beside_cache(cache, suffix: str) -> pathlib.Path:
    """``<cache file><suffix>``; for a cache that is not a local file (a database URL),
    a folder named after it in the user cache directory."""
    location = str(cache.path)
    if "://" not in location:
        return pathlib.Path(os.path.abspath(location + suffix))  # a path that survives chdir()
    digest = hashlib.sha256(location.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return _user_cache_dir() / f"server-{digest}{suffix}"


def _files_root(cache) -> pathlib.Path:
    return _beside_cache(cache, FILES_DIR_SUFFIX)


def _unpacked_root(cache) -> pathlib.Path:
    return _beside_cache(cache, UNPACKED_DIR_SUFFIX)


def _content_key(hash_type: str, hash_hex: str) -> str:
    return f"{hash_type}-{hash_hex}"


def _parse_content_key(name: str) -> tuple[str, str] | None:
    """(hash type, hash) of a folder name made by ``_content_key``, else None (not ours)."""
    hash_type, found, hash_hex = name.partition("-")
    if not found or not hash_type or not hash_hex or hash_hex.strip("0123456789abcdef"):
        return None
    return hash_type, hash_hex


class _FolderLock:
    """An exclusive lock on a lock file (``flock``: held per open file, so threads of one
    process exclude each other too, and released when a process dies). After locking,
    the lock file must still be the one at ``path`` (gc() may have removed it with its
    folder meanwhile); otherwise lock again. Without ``fcntl`` (Windows) it does nothing:
    writers then race, but each writes a private temporary file first."""

    def __init__(self, path: pathlib.Path, *, blocking: bool = True):
        self._path = path
        self._blocking = blocking
        self._fd: int | None = None

    def __enter__(self) -> bool:
        if _fcntl is None:
            return True
        for _ in range(100):  # each retry means gc() removed the folder under us: rare
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                _fcntl.flock(fd, _fcntl.LOCK_EX | (0 if self._blocking else _fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self._path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)
        raise CacheFileError(f"Cannot lock {self._path}: it keeps being removed.", path=self._path)

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _verified_content(cache, content_id: int, response) -> tuple[str, str, int]:
    """(hash type, hash, size) of a response's content, which must be complete and not
    found corrupted."""
    head = cache._store.content_head(content_id)
    if head is None:
        raise NotCachedError(f"Version {response.version} of {response.url} is no longer in the cache "
                             f"{cache.path} (the version was deleted or collected).")
    hash_type, hash_hex, size = head
    if hash_hex is None:
        raise IntegrityError(f"Version {response.version} of {response.url} has no verified content in "
                             f"{cache.path} (it is incomplete or was found corrupted).")
    return hash_type, hash_hex, size


def _is_complete_file(path: pathlib.Path, size: int) -> bool:
    """A regular file (not a link) of ``size`` bytes at ``path``."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size


def _materialise(cache, content_id: int, response) -> pathlib.Path:
    """The path of the read-only file holding a content (see ``Response.as_file``)."""
    hash_type, hash_hex, size = _verified_content(cache, content_id, response)
    folder = _files_root(cache) / _content_key(hash_type, hash_hex)
    # Sanitised names never start with a dot, so they never meet ".lock" or ".tmp-" files.
    name = _sanitize_filename(response.content_attributes.filename) or FALLBACK_FILENAME
    path = folder / name
    if _is_complete_file(path, size):
        return path  # the common case: no lock, no write
    # A read-only cache writes nothing, beside it either (the folder may be shared or
    # on read-only media, and gc() could never clean up after it).
    cache._store.require_writable()
    try:
        with _FolderLock(folder / ".lock"):
            if _is_complete_file(path, size):
                return path  # another thread or process wrote it while we waited
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # damaged (wrong size): write it again
            # The same content under another name: one more link, no second copy.
            for existing in folder.iterdir():
                if existing.name.startswith(".") or not _is_complete_file(existing, size):
                    continue
                try:
                    os.link(existing, path)
                    return path
                except OSError:
                    break  # no hard links here: write a copy
            _write_content_file(cache, content_id, hash_hex, path)
    except OSError as exc:
        raise CacheFileError(f"Cannot write the file for version {response.version} of {response.url} "
                             f"under {folder}: {exc}.", path=folder) from exc
    return path


def _write_content_file(cache, content_id: int, hash_hex: str, path: pathlib.Path) -> None:
    """Stream a content into a private temporary file, checking its hash on the way, then
    give it its read-only name atomically. Runs under the folder's lock."""
    handle, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as output, \
                cache._store.open_content(content_id, check_hash=hash_hex) as stream:
            while piece := stream.read(DEFAULT_CHUNK_SIZE_BYTES):
                output.write(piece)
            output.flush()
            os.fsync(output.fileno())  # the name must never point to bytes still in flight
        os.chmod(temp_name, 0o444)
        try:
            # A link, unlike rename, never replaces a file a racer (without flock) made.
            os.link(temp_name, path)
        except FileExistsError:
            pass
        except OSError:
            if not path.exists():
                os.replace(temp_name, path)  # file systems without hard links
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)


# --- unpacking ----------------------------------------------------------------------


@dataclasses.dataclass
class _UnpackLimits:
    """Limits of one unpack and what it has used so far (counted while writing)."""

    max_bytes: int
    max_members: int
    bytes: int = 0
    members: int = 0

    def add_member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise IntegrityError(f"The archive has more than {self.max_members} members (at {name!r}); "
                                 "refused as a possible archive bomb.")

    def add_bytes(self, count: int, name: str) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise IntegrityError(f"The archive unpacks to more than {self.max_bytes} bytes (at {name!r}); "
                                 "refused as a possible archive bomb.")


class _ArchiveReadError(Exception):
    """A damaged archive or compressed stream (translated to IntegrityError by _unpack)."""


class _ArchiveSource(io.RawIOBase):
    """A decompressing reader whose decoding errors become _ArchiveReadError, so they
    stay apart from errors of writing the unpacked files."""

    def __init__(self, inner):
        super().__init__()
        import lzma  # noqa: PLC0415 - archives only; see the imports note
        self._inner = inner
        self._DECODING_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._inner.read(size)
        except self._DECODING_ERRORS as exc:
            raise _ArchiveReadError(str(exc) or type(exc).__name__) from exc

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._inner.seek(offset, whence)
        except self._DECODING_ERRORS as exc:
            raise _ArchiveReadError(str(exc) or type(exc).__name__) from exc

    def tell(self) -> int:
        return self._inner.tell()


class _SafeWriter:
    """Writes archive members under ``root`` and nowhere else.

    A member name must be relative, without ``..``, drive or NUL; every parent folder
    is created here and must resolve inside ``root`` when written to; files are created
    with ``O_EXCL | O_NOFOLLOW``, so an existing link is never written through; a link
    must resolve inside ``root`` when made and again once everything is written.
    """

    def __init__(self, root: pathlib.Path, limits: _UnpackLimits):
        self.root = root
        self._real_root = os.path.realpath(root)
        self._limits = limits
        self._links: list[str] = []

    def _path_of(self, name: str) -> str:
        if "\x00" in name:
            raise IntegrityError(f"Archive member {name!r} has a NUL in its name; refused.")
        unified = name.replace("\\", "/")
        parts = [part for part in unified.split("/") if part not in ("", ".")]
        if (unified.startswith("/") or ".." in parts or not parts
                or (len(parts[0]) >= 2 and parts[0][1] == ":")):
            raise IntegrityError(f"Archive member {name!r} would be written outside the folder "
                                 "(absolute path, drive or '..'); refused.")
        return os.path.join(self.root, *parts)

    def _is_inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self._real_root or real.startswith(self._real_root + os.sep)

    def _prepare_parent(self, name: str, path: str) -> None:
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o777, exist_ok=True)
        if not self._is_inside(parent):
            raise IntegrityError(f"Archive member {name!r} would be written through a link leading "
                                 "outside the folder; refused.")

    def _clear(self, name: str, path: str) -> None:
        """Make room for a member whose name came before (the later one wins, as with tar)."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            raise IntegrityError(f"Archive member {name!r} clashes with a folder of the same name; refused.")
        os.unlink(path)

    def directory(self, name: str) -> None:
        self._limits.add_member(name)
        path = self._path_of(name)
        self._prepare_parent(name, path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o777)
        if not os.path.isdir(path) or not self._is_inside(path):
            raise IntegrityError(f"Archive member {name!r} is not a folder inside the folder; refused.")

    def file(self, name: str, source, *, executable: bool = False) -> None:
        self._limits.add_member(name)
        path = self._path_of(name)
        self._prepare_parent(name, path)
        self._clear(name, path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        handle = os.open(path, flags, 0o777 if executable else 0o666)
        with os.fdopen(handle, "wb") as output:
            while piece := source.read(READ_SIZE_BYTES):
                self._limits.add_bytes(len(piece), name)
                output.write(piece)

    def symlink(self, name: str, target: str) -> None:
        self._limits.add_member(name)
        path = self._path_of(name)
        self._prepare_parent(name, path)
        if not target or "\x00" in target or os.path.isabs(target) or target.startswith(("/", "\\")):
            raise IntegrityError(f"Archive link {name!r} -> {target!r} leads outside the folder; refused.")
        self._clear(name, path)
        os.symlink(target, path)
        self._links.append(path)
        if not self._is_inside(path):
            raise IntegrityError(f"Archive link {name!r} -> {target!r} leads outside the folder; refused.")

    def hardlink(self, name: str, target_name: str) -> None:
        self._limits.add_member(name)
        path, source = self._path_of(name), self._path_of(target_name)
        self._prepare_parent(name, path)
        if not self._is_inside(source) or not os.path.isfile(source):
            raise IntegrityError(f"Archive hard link {name!r} -> {target_name!r} does not name a file "
                                 "unpacked before it; refused.")
        self._clear(name, path)
        try:
            os.link(os.path.realpath(source), path)
        except OSError:
            with open(source, "rb") as original:
                self._limits.members -= 1  # counted above already
                self.file(name, original)

    def finish(self) -> None:
        """Every link must still resolve inside the folder once everything is written."""
        for path in self._links:
            if not self._is_inside(path):
                raise IntegrityError(f"Archive link {os.path.relpath(path, self.root)!r} leads outside "
                                     "the folder; refused.")


#: Magic numbers of the single-stream compressions unpack() understands.
_COMPRESSIONS = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


def _decompressing_reader(stream, compression: str):
    import bz2, gzip, lzma  # noqa: E401, PLC0415 - archives only; see the imports note
    if compression == "gz":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(stream, mode="rb")
    return lzma.LZMAFile(stream, mode="rb")


def _is_tar_header(block: bytes) -> bool:
    import tarfile  # noqa: PLC0415 - archives only; see the imports note
    if len(block) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(block[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _unpack_zip(stream, writer: _SafeWriter) -> None:
    import zipfile  # noqa: PLC0415 - archives only; see the imports note
    with zipfile.ZipFile(stream) as archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if info.is_dir() or kind == stat.S_IFDIR:
                writer.directory(info.filename)
            elif kind == stat.S_IFLNK:
                with archive.open(info) as member:
                    target = member.read(MAX_LINK_TARGET_BYTES + 1)
                if len(target) > MAX_LINK_TARGET_BYTES:
                    raise IntegrityError(f"Archive link {info.filename!r} has an over-long target; refused.")
                writer.symlink(info.filename, target.decode("utf-8", "surrogateescape"))
            elif kind in (0, stat.S_IFREG):
                with archive.open(info) as member:
                    writer.file(info.filename, member, executable=bool(mode & 0o111))
            else:
                raise IntegrityError(f"Archive member {info.filename!r} is a device, FIFO or socket; refused.")


def _unpack_tar(source, writer: _SafeWriter) -> None:
    import tarfile  # noqa: PLC0415 - archives only; see the imports note
    # Stream mode ("r|"): members are read in order, never by seeking to offsets the
    # headers claim.
    with tarfile.open(fileobj=source, mode="r|") as archive:
        for member in archive:
            if member.isdir():
                writer.directory(member.name)
            elif member.isfile():
                member_file = archive.extractfile(member)
                writer.file(member.name, member_file, executable=bool(member.mode & 0o111))
            elif member.issym():
                writer.symlink(member.name, member.linkname)
            elif member.islnk():
                writer.hardlink(member.name, member.linkname)
            else:
                raise IntegrityError(f"Archive member {member.name!r} is a device, FIFO or special file; "
                                     "refused.")


def _unpack_into(cache, content_id: int, response, folder: pathlib.Path, limits: _UnpackLimits) -> None:
    """Unpack the content into the empty ``folder`` (a temporary one the caller renames)."""
    import tarfile, zipfile  # noqa: E401, PLC0415 - archives only; see the imports note
    writer = _SafeWriter(folder, limits)
    with cache._store.open_content(content_id) as raw:
        stream = io.BufferedReader(raw, buffer_size=READ_SIZE_BYTES)
        # Decide by what the bytes are, not by the file name: compression magic first,
        # then a tar header at the start, then a zip directory at the end (checked last:
        # a tar whose last member is a zip would look like one).
        magic = stream.read(8)
        stream.seek(0)
        compression = next((name for prefix, name in _COMPRESSIONS if magic.startswith(prefix)), None)
        source = _ArchiveSource(_decompressing_reader(stream, compression) if compression else stream)
        is_tar = _is_tar_header(source.read(tarfile.BLOCKSIZE))
        source.seek(0)
        if not is_tar and compression is None and zipfile.is_zipfile(stream):
            stream.seek(0)
            _unpack_zip(stream, writer)
        elif is_tar:
            _unpack_tar(io.BufferedReader(source, buffer_size=READ_SIZE_BYTES), writer)
        elif compression is not None:
            name = _sanitize_filename(response.content_attributes.filename) or FALLBACK_FILENAME
            stem = name[:-len(compression) - 1] if name.lower().endswith("." + compression) else name
            writer.file(_sanitize_filename(stem) or FALLBACK_FILENAME, source)
        else:
            raise InvalidRequestError(f"Version {response.version} of {response.url} is not a zip, tar, "
                                      "gz, bz2 or xz archive; nothing to unpack.")
        writer.finish()


def _unpack(cache, content_id: int, response, target: pathlib.Path | None,
            limits: _UnpackLimits) -> pathlib.Path:
    """Unpack a content (see ``Response.unpack``) and return the folder."""
    import lzma, tarfile, zipfile  # noqa: E401, PLC0415 - archives only; see the imports note
    hash_type, hash_hex, _ = _verified_content(cache, content_id, response)
    key = _content_key(hash_type, hash_hex)
    try:
        if target is None:
            root = _unpacked_root(cache)
            folder = root / key
            if folder.is_dir():
                return folder
            cache._store.require_writable()  # a read-only cache writes nothing beside it
            with _FolderLock(root / f".lock-{key}"):
                if not folder.is_dir():
                    _unpack_to_new_folder(cache, content_id, response, folder, limits)
            return folder
        if target.exists() and not target.is_dir():
            raise InvalidRequestError(f"Cannot unpack version {response.version} of {response.url} into "
                                      f"{target}: it exists and is not a folder.")
        if not target.exists():
            try:
                _unpack_to_new_folder(cache, content_id, response, target, limits)
                return target
            except OSError:
                if not target.is_dir():  # else another caller made it meanwhile: unpack over it
                    raise
        _unpack_over_folder(cache, content_id, response, target, limits)
        return target
    except _ArchiveReadError as exc:
        raise IntegrityError(f"Version {response.version} of {response.url} is a damaged archive: "
                             f"{exc}.") from exc
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, lzma.LZMAError) as exc:
        raise IntegrityError(f"Version {response.version} of {response.url} is a damaged archive: "
                             f"{exc}.") from exc
    except (NotImplementedError, RuntimeError) as exc:  # zip: unknown compression, encryption
        raise InvalidRequestError(f"Version {response.version} of {response.url} cannot be unpacked: "
                                  f"{exc}.") from exc
    except OSError as exc:
        where = target if target is not None else _unpacked_root(cache)
        raise CacheFileError(f"Cannot unpack version {response.version} of {response.url} into "
                             f"{where}: {exc}.", path=where) from exc


def _unpack_to_new_folder(cache, content_id: int, response, folder: pathlib.Path,
                          limits: _UnpackLimits) -> None:
    """Unpack into a temporary folder beside ``folder``, then rename it to ``folder``
    (which must not exist: FileExistsError or another OSError otherwise)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=folder.parent)
    try:
        os.chmod(temp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        _unpack_into(cache, content_id, response, pathlib.Path(temp), limits)
        os.rename(temp, folder)
    finally:
        if os.path.exists(temp):
            shutil.rmtree(temp, ignore_errors=True)


def _unpack_over_folder(cache, content_id: int, response, folder: pathlib.Path,
                        limits: _UnpackLimits) -> None:
    """Unpack into a temporary folder inside the existing ``folder``, then merge it in.

    The caller's folder is never deleted from nor overwritten: archive folders merge
    into existing folders of the same name; an entry already there with other content
    (or of another kind, or a link to a folder) is InvalidRequestError before anything
    is moved. Hidden top-level names (``.bashrc``, ``.ssh``) are refused: an archive
    must not plant them in a folder that already exists, a home folder perhaps."""
    temp = pathlib.Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=folder))
    try:
        _unpack_into(cache, content_id, response, temp, limits)
        hidden = sorted(entry.name for entry in temp.iterdir() if entry.name.startswith("."))
        if hidden:
            raise InvalidRequestError(f"Version {response.version} of {response.url} holds hidden top-level "
                                      f"entries ({', '.join(map(repr, hidden[:5]))}); refused when unpacking "
                                      f"into the existing folder {folder}.")
        clashes = _merge_clashes(temp, folder)
        if clashes:
            raise InvalidRequestError(
                f"Cannot unpack version {response.version} of {response.url} into {folder}: "
                f"{len(clashes)} entr{'y' if len(clashes) == 1 else 'ies'} already there with other content "
                f"({', '.join(map(repr, clashes[:5]))}); nothing was written.")
        _merge_folder(temp, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _same_entry(new: pathlib.Path, old: pathlib.Path) -> bool:
    """True when ``old`` is a file or link equal to the unpacked ``new`` (kept as it is)."""
    try:
        new_info, old_info = os.lstat(new), os.lstat(old)
        if stat.S_ISLNK(new_info.st_mode) or stat.S_ISLNK(old_info.st_mode):
            return stat.S_ISLNK(old_info.st_mode) and stat.S_ISLNK(new_info.st_mode) \
                and os.readlink(new) == os.readlink(old)
        return (stat.S_ISREG(old_info.st_mode) and stat.S_ISREG(new_info.st_mode)
                and filecmp.cmp(new, old, shallow=False))
    except OSError:
        return False


def _merge_clashes(source: pathlib.Path, folder: pathlib.Path, prefix: str = "") -> list[str]:
    """Names (relative to ``folder``) where merging ``source`` would replace something."""
    clashes = []
    for entry in sorted(source.iterdir()):
        destination = folder / entry.name
        if not os.path.lexists(destination):
            continue
        name = prefix + entry.name
        if entry.is_dir() and not entry.is_symlink():
            if destination.is_dir() and not destination.is_symlink():
                clashes += _merge_clashes(entry, destination, name + "/")
            else:
                clashes.append(name)
        elif not _same_entry(entry, destination):
            clashes.append(name)
    return clashes


def _merge_folder(source: pathlib.Path, folder: pathlib.Path) -> None:
    """Move what ``source`` holds into ``folder``, which has no clashing entry
    (see ``_merge_clashes``): new entries by rename, folders merged, equal files kept."""
    for entry in sorted(source.iterdir()):
        destination = folder / entry.name
        if not os.path.lexists(destination):
            os.rename(entry, destination)
        elif entry.is_dir() and not entry.is_symlink():
            _merge_folder(entry, destination)


# --- collection and accounting -------------------------------------------------------


def _remove_entry(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _remove_if_stale(entry: os.DirEntry, now: float) -> None:
    with contextlib.suppress(OSError):
        if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SEC:
            _remove_entry(pathlib.Path(entry.path))


def _sweep_content_files(cache) -> None:
    """Remove the materialised files and unpacked folders whose content is no longer
    stored, and temporary leftovers older than STALE_TEMP_SEC. An entry being written
    (its lock held) is left for a later gc()."""
    now = time.time()
    for root, locks_inside in ((_files_root(cache), True), (_unpacked_root(cache), False)):
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            path = pathlib.Path(entry.path)
            if entry.name.startswith(_TEMP_PREFIX):
                _remove_if_stale(entry, now)
                continue
            if entry.name.startswith(".lock-"):
                if not (root / entry.name[len(".lock-"):]).exists():
                    with _FolderLock(path, blocking=False) as held:
                        if held:
                            with contextlib.suppress(OSError):
                                os.unlink(path)
                continue
            parsed = _parse_content_key(entry.name)
            if parsed is None:
                continue
            if cache._store.has_content(*parsed):
                if locks_inside:  # a writer that died leaves its temporary file in the folder
                    with contextlib.suppress(OSError):
                        for inner in os.scandir(path):
                            if inner.name.startswith(_TEMP_PREFIX):
                                _remove_if_stale(inner, now)
                continue
            lock = path / ".lock" if locks_inside else root / f".lock-{entry.name}"
            with _FolderLock(lock, blocking=False) as held:
                if held:
                    _remove_entry(path)
                    if not locks_inside:
                        with contextlib.suppress(OSError):
                            os.unlink(lock)


def _bytes_under(root: pathlib.Path) -> int:
    """Bytes of the regular files under ``root`` (each file once, links not followed)."""
    total, seen = 0, set()
    pending = [str(root)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
                elif stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_size
    return total


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def _keyed_digest(salt: bytes, value: str) -> str:
    """How a sensitive value is stored: ``hmac-sha256:<hex>`` keyed with the file's salt."""
    return "hmac-sha256:" + hmac.new(salt, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


class _Identity:
    """A validated request identity: what makes two fetches the same request.

    ``url`` is the URL as stored and shown: credentials moved to an Authorization
    header, values of sensitive query parameters replaced by ``***``; ``send_url`` is
    what goes on the wire. Sensitive header and parameter values take part in ``key``
    only as keyed digests, and ``stored_headers``/``stored_params`` hold those digests.
    """

    __slots__ = ("url", "send_url", "method", "params", "stored_params", "send_headers",
                 "body_kind", "body", "group", "key", "stored_headers", "secrets", "sensitive_sets",
                 "arguments")

    def __init__(self, url, method, params, headers, body, group, *, salt: bytes,
                 sensitive: frozenset, sensitive_params: frozenset = frozenset()):
        #: What this identity was built from, to build it again if the sensitive names change.
        self.arguments = (url, method, params, headers, body, group)
        self.sensitive_sets = (sensitive, sensitive_params)
        url = _check_url(url)
        if not isinstance(method, str) or method.lower() not in HTTP_METHODS:
            raise InvalidRequestError(f"method must be one of {', '.join(HTTP_METHODS)}, not {method!r}.")
        self.method = method.lower()
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"params must be a dict, not {type(params).__name__}.")
        if params and not all(isinstance(name, str) for name in params):
            raise InvalidRequestError("params names must be strings.")
        if headers is not None and not isinstance(headers, dict):
            raise InvalidRequestError(f"headers must be a dict, not {type(headers).__name__}.")
        if not isinstance(group, str) or not group or not group.isprintable():
            raise InvalidRequestError(f"group must be a non-empty printable string, not {group!r}.")
        self.params = dict(params) if params else None
        if self.params:
            try:  # What request_url() will do: it must not fail after rows were written.
                urllib.parse.urlencode(self.params, doseq=True)
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidRequestError(f"params cannot be encoded into a query string: {exc}.") from None
        self.send_headers = {_check_header(name, value): value for name, value in (headers or {}).items()}
        self.send_url, credentials = _split_credentials(url)
        #: Clear-text secrets of this call, for scrubbing them out of error messages.
        self.secrets: list[str] = []
        if credentials and not any(name.lower() == "authorization" for name in self.send_headers):
            # Sent as Basic auth (as requests does) and, like any Authorization, kept out of
            # the file in clear.
            self.send_headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        if credentials:
            self.secrets.append(credentials.partition(":")[2])
        self.body_kind, self.body = _encode_body(body)
        self.group = group
        # Sensitive values take part in the identity only as keyed digests.
        self.stored_headers = {
            name: (_keyed_digest(salt, value) if name.lower() in sensitive else value)
            for name, value in self.send_headers.items()}
        self.secrets += [value for name, value in self.send_headers.items() if name.lower() in sensitive]
        self.stored_params = self.params
        url_digests: list = []
        self.url = self.send_url
        if sensitive_params:
            if self.params and any(name.lower() in sensitive_params for name in self.params):
                self.stored_params = {}
                for name, value in self.params.items():
                    if name.lower() in sensitive_params:
                        values = value if isinstance(value, (list, tuple)) else [value]
                        self.secrets += [str(item) for item in values]
                        value = [_keyed_digest(salt, str(item)) for item in values] if isinstance(
                            value, (list, tuple)) else _keyed_digest(salt, str(value))
                    self.stored_params[name] = value
            query = urllib.parse.urlsplit(self.send_url).query
            for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
                if name.lower() in sensitive_params:
                    url_digests.append([name.lower(), _keyed_digest(salt, value)])
                    self.secrets.append(value)
            if url_digests:
                self.url = _mask_url(self.send_url, sensitive_params)
        self.secrets = [secret for secret in self.secrets if len(secret) >= 3]
        identity = [self.method, self.url, self.stored_params,
                    sorted((name.lower(), value) for name, value in self.stored_headers.items()),
                    self.body_kind, hashlib.sha256(self.body).hexdigest() if self.body is not None else None,
                    self.group]
        if url_digests:
            identity.append(url_digests)
        self.key = hashlib.sha256(_canonical_json(identity).encode()).hexdigest()

    def request_url(self) -> str:
        """The URL sent: ``send_url`` with ``params`` encoded into its query string."""
        if not self.params:
            return self.send_url
        query = urllib.parse.urlencode(self.params, doseq=True)
        return self.send_url + ("&" if urllib.parse.urlsplit(self.send_url).query else "?") + query

    def scrub(self, text: str) -> str:
        """``text`` with every clear-text secret of this call (in plain or URL-encoded
        form) replaced by ``***``: for messages built from what the network said."""
        text = str(text)
        for secret in self.secrets:
            for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}:
                text = text.replace(form, MASK)
        return text


@dataclasses.dataclass
class _FetchCall:
    """The validated options of one fetch() call."""

    identity: _Identity
    description: str | None = None
    documentation_link: str | None = None
    configuration: Any = None            # RequestCacheConfiguration or None
    hash_type: str | None = None
    expected_hash: str | None = None     # lower-case hex
    expected_algorithm: str | None = None
    prefer_cached: bool = True
    prefer_version: str | None = None
    prefer_tag: str | None = None
    prefer_pinned: bool | None = None
    force_version: str | None = None
    force_tag: str | None = None
    force_pinned: bool | None = None
    offline: bool = False
    pin_for: float | None = None
    as_of: dt.datetime | None = None
    validator: Any = None
    progress: Any = None
    refresh: bool = False                # a download is due now, whatever the strategy and backoff
    stale_if_error: bool = True          # False: a failed due download raises instead of serving L
    retries: int | None = None           # None: the Cache's
    timeout: Any = None                  # urllib3.Timeout, or None: the Cache's
    locked: bool = False                 # expected_hash comes from the lockfile

    @property
    def is_hard_choice(self) -> bool:
        return (self.force_version is not None or self.force_tag is not None
                or self.force_pinned is not None or self.as_of is not None)


@dataclasses.dataclass
class _Claim:
    """The result of trying to start a download: either this call owns the version row
    ``row_id`` (and its lease), or another download ``other_row_id`` is running."""

    request_id: int
    row_id: int | None = None
    owner: str | None = None
    other_row_id: int | None = None
    resume: Any = None  # the abandoned row being resumed, if any
    settled: bool = False  # a suitable ready version appeared meanwhile: nothing to download
    version: str | None = None  # the version string given before the validator ran
    request: Any = None  # the request record as the claim saw it (or None: read it again)
    first_row: Any = None  # the version record, when the claim created the request with it


@dataclasses.dataclass
class _Completed:
    """A fully received content, not yet published: stored as chunks (``content_id``),
    or, when small, still in memory (``body``; ``content_id`` None), to be stored by the
    transaction that publishes it."""

    content_id: int | None
    hash_hex: str
    size: int
    attributes: dict
    stats: dict
    cache_headers: dict | None = None   # the origin's caching headers (CACHING_HEADERS)
    body: bytes | None = None           # the whole content, when it was kept in memory


class _NotModified:
    """The origin answered 304 to a conditional request; ``cache_headers`` are the
    caching headers it sent, which update the stored ones (RFC 9111 section 4.3.4)."""

    def __init__(self, cache_headers: dict):
        self.cache_headers = cache_headers


class _DownloadFailure(Exception):
    """A due download failed for good (after retries), or its content was rejected."""

    def __init__(self, message: str, *, status_code: int | None = None, cause: object = None,
                 stats: dict | None = None, starts_backoff: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.cause = cause
        self.stats = stats or {}
        #: A failure of the origin or the network (not of the content): later fetches
        #: back off, for at least ``retry_after`` seconds when the origin said so.
        self.starts_backoff = starts_backoff
        self.retry_after = retry_after


class _Crowded(Exception):
    """The first version of a new request cannot be published on what its claim wrote
    (its lease was lost, or another version of the request appeared)."""


class _LeaseLost(Exception):
    """Another process took over this download (our lease had expired)."""


class _SensitiveNamesChanged(Exception):
    """Another Cache declared sensitive names after this call built its identity."""


def _is_leased(row, now: float) -> bool:
    return row.pinned_until_unix is not None and row.pinned_until_unix > now


#: How much longer than its lease a heartbeat must stay unchanged, on the waiter's own
#: monotonic clock, before the waiter declares the download dead: room for a renewal
#: that waited for the write lock.
LEASE_SILENCE_MARGIN_SEC = 0.5
#: Without an observation of its own, a process counts an in-flight row as abandoned
#: (for GC) only when its stored lease end lies this many lease lengths in the past by
#: the process's wall clock: a downloader whose clock runs minutes behind writes lease
#: ends that already look past to others.
ABANDONED_WITHOUT_OBSERVATION_LEASES = 10.0
_LEASE_SIGHTINGS_MAX = 4096
_lease_sightings: dict[tuple[str, int], tuple[tuple, float]] = {}
_lease_sightings_lock = threading.Lock()


def _lease_released(row) -> bool:
    """Did the holder give the lease up (no lease, or the end set to 0 by ``_abandon``)?"""
    return not row.lease_expires_unix or row.lease_expires_unix <= 0


def _lease_silence(path: str, row) -> float | None:
    """How long, in seconds of this process's monotonic clock, the heartbeat of an
    in-flight row's lease (its owner and stored end, which every renewal changes) has
    been seen unchanged; None when this process sees this heartbeat for the first time
    (it is remembered from now on). Comparing the stored end with this process's wall
    clock would make processes whose clocks disagree take each other's live leases."""
    heartbeat = (row.lease_owner, row.lease_expires_unix)
    moment = time.monotonic()
    key = (path, row.id)
    with _lease_sightings_lock:
        seen = _lease_sightings.get(key)
        if seen is not None and seen[0] == heartbeat:
            return moment - seen[1]
        if len(_lease_sightings) >= _LEASE_SIGHTINGS_MAX:
            for old in sorted(_lease_sightings, key=lambda k: _lease_sightings[k][1])[:_LEASE_SIGHTINGS_MAX // 2]:
                del _lease_sightings[old]
        _lease_sightings[key] = (heartbeat, moment)
        return None


def _lease_is_live(path: str, row, lease_sec: float) -> bool:
    """Is another download's lease alive, judged by whether its heartbeat still changes?
    A heartbeat seen for the first time counts as alive."""
    if _lease_released(row):
        return False
    silence = _lease_silence(path, row)
    return silence is None or silence < lease_sec + LEASE_SILENCE_MARGIN_SEC


def _gc_selection(rows: list, configuration: RequestCacheConfiguration,
                  now: float, abandoned: Callable[[Any], bool] | None = None) -> dict[int, tuple[Any, str]]:
    """Which version rows of one request garbage collection removes, and why, as
    ``{version id: (row, reason)}``: a pure function of the rows (newest first), the
    request's configuration and the time. ``abandoned`` says whether an in-flight row's
    download is dead; without it, a row whose lease end is not after ``now`` is.

    ======================================  ======================================
    rows                                    kept / removed (reason)
    ======================================  ======================================
    the newest ready version                always kept (it is what fetch serves)
    ready, leased (``pinned_until`` > now)  kept
    ready, permanently pinned               the newest ``max_cached_pinned_versions``
                                            kept, older ones removed ("pinned")
    ready, neither pinned nor leased        the newest ``max_cached_unpinned_versions``
                                            kept, older ones removed ("unpinned")
    failed                                  the newest kept, older removed ("failed")
    duplicate                               removed ("duplicate")
    wait / in_progress, lease expired       removed ("abandoned")
    wait / in_progress, lease running       kept (a download is in flight)
    ======================================  ======================================
    """
    ready = [row for row in rows if row.status == "ready"]
    newest_id = ready[0].id if ready else None
    removals: dict[int, tuple[Any, str]] = {}
    permanent = [row for row in ready if row.pinned]
    for row in permanent[configuration.max_cached_pinned_versions:]:
        if row.id != newest_id and not _is_leased(row, now):
            removals[row.id] = (row, "pinned")
    unpinned = [row for row in ready if not row.pinned and not _is_leased(row, now)]
    for row in unpinned[configuration.max_cached_unpinned_versions:]:
        if row.id != newest_id:
            removals[row.id] = (row, "unpinned")
    for row in [row for row in rows if row.status == "failed"][1:]:
        removals[row.id] = (row, "failed")
    for row in rows:
        if row.status == "duplicate":
            removals[row.id] = (row, "duplicate")
        elif row.status in IN_FLIGHT_STATUSES and (
                abandoned(row) if abandoned is not None else (row.lease_expires_unix or 0) <= now):
            removals[row.id] = (row, "abandoned")
    return removals


def _is_resumable_row(row) -> bool:
    """Do the stored resume validators and attributes of an abandoned row read back?"""
    try:
        return (isinstance(json.loads(row.resume_from), dict)
                and isinstance(json.loads(row.content_attributes or "{}"), dict))
    except _DAMAGE_ERRORS:
        return False


def _row_tags(row) -> list[str]:
    """The tags stored on a version row; ValueError when they are not a JSON list of strings."""
    if not row.tags or row.tags == "[]":  # most versions have none
        return []
    tags = json.loads(row.tags)
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ValueError("the stored tags are not a list of strings")
    return tags


def _matches(row, *, version=None, tag=None, pinned=None, now: float) -> bool:
    """Does a version row match the given choices (None = any)?"""
    if version is not None and row.version != version:
        return False
    if tag is not None and tag not in _row_tags(row):
        return False
    if pinned is not None and (row.pinned or _is_leased(row, now)) != pinned:
        return False
    return True


def _has_validators(row) -> bool:
    """Can a conditional GET confirm this version (it has an ETag or a Last-Modified)?"""
    attributes = json.loads(row.content_attributes or "{}")
    return bool(attributes.get("etag") or attributes.get("last_modified_datetime_utc"))


def _plan(strategy, newest, now: float, *, cron_first_run: bool = False) -> str:
    """By the strategy: "serve" the newest ready version, "download", or "conditional" GET.

    Policy, with no I/O: a function of the strategy, the newest ready version row (None
    when there is none) and the time; ``cron_first_run``: the cron strategy's run at
    start is due (its caller remembers which requests had theirs)."""
    if newest is None:
        return "download"
    age = now - (newest.validated_unix or 0.0)
    name = strategy.strategy_name
    if name == "never":
        return "serve"
    if name == "age":
        return "download" if age > strategy.seconds else "serve"
    if name == "when_requested":
        return "conditional" if _has_validators(newest) else "download"
    if name == "when_remote_changed":
        if age < strategy.check_interval_sec:
            return "serve"
        if _has_validators(newest):
            return "conditional"
        return "download" if age > strategy.fallback_max_age_sec else "serve"
    if name == "http":
        try:
            stored = json.loads(newest.cache_headers or "{}")
        except ValueError:
            stored = {}  # damaged: as if the origin had said nothing
        stored = {name: value for name, value in stored.items() if isinstance(value, str)} \
            if isinstance(stored, dict) else {}
        left = _http_freshness(stored, now, newest.validated_unix)
        if left is None:
            left = strategy.fallback_max_age_sec - age
        if left > 0:
            return "serve"
        return "conditional" if _has_validators(newest) else "download"
    # cron
    if cron_first_run:
        return "download"
    next_tick = _optional_extra("croniter").croniter(strategy.cron, _to_datetime(newest.validated_unix)).get_next(float)
    return "download" if next_tick <= now else "serve"


def _choose_version(call, ready: list, now: float, *, hard: bool = False):
    """The version row a fetch returns among ``ready`` (newest first), or None.

    Policy, with no I/O: ``as_of`` keeps only the version newest at that moment;
    ``expected_hash`` keeps those with that hash; ``hard`` (force_*) returns the newest
    row matching every forced choice; otherwise the soft preferences are dropped in
    Buffy's order (pinned, then tag, then version) until some row matches."""
    if call.as_of is not None:
        # Only the version newest at that moment may answer; the other choices then
        # accept or refuse it, never pick an older one that was not current then.
        current = next((row for row in ready if row.cached_unix is not None
                        # Compared as shown: microsecond datetimes.
                        and _to_datetime(row.cached_unix) <= call.as_of), None)
        ready = [current] if current is not None else []
    candidates = [row for row in ready
                  if call.expected_hash is None or row.content_hash_hex == call.expected_hash]
    if hard:
        for row in candidates:
            if _matches(row, version=call.force_version, tag=call.force_tag,
                        pinned=call.force_pinned, now=now):
                return row
        return None
    # Soft preferences are dropped in Buffy's order: pinned, then tag, then version.
    for keep in (3, 2, 1, 0):
        wanted = {"version": call.prefer_version if keep >= 1 else None,
                  "tag": call.prefer_tag if keep >= 2 else None,
                  "pinned": call.prefer_pinned if keep >= 3 else None}
        for row in candidates:
            if _matches(row, now=now, **wanted):
                return row
    return None


class _LeaseKeeper:
    """Keeps a download lease alive, every third of its length, whatever the download
    is doing (waiting for headers, stalled, validating), and notes when the lease was
    lost to another process. All keepers of a process share one renewing thread
    (``_LeaseRenewer``): starting a thread per download would cost more than a small
    download itself."""

    def __init__(self, store: _Store, claim: _Claim, lease_sec: float):
        self.store = store
        self.claim = claim
        self.lease_sec = lease_sec
        self.due = time.monotonic() + lease_sec / 3
        self.lost = False
        #: Held while this keeper's lease is being renewed: stop() waits for it, so no
        #: renewal lands after the download let its lease lapse.
        self.renewing = threading.Lock()
        _LeaseRenewer.shared().add(self)

    def renew(self) -> None:
        """Renew the lease now (from the renewing thread)."""
        claim = self.claim
        try:
            renewed = self.store.renew_lease(claim, self.lease_sec)
        except BuffyliteError as exc:  # try again at the next beat
            log.debug("Renewing the download lease failed: %s", exc)
            return
        if not renewed:
            self.lost = True

    def stop(self) -> None:
        """Stop renewing; returns once no renewal of this lease is running."""
        _LeaseRenewer.shared().discard(self)
        with self.renewing:
            pass


class _LeaseRenewer:
    """The one thread of a process that renews the download leases of its keepers,
    each when it falls due. Started when first needed, and again in a forked child."""

    _instance: "_LeaseRenewer | None" = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._keepers: list[_LeaseKeeper] = []
        self._changed = threading.Condition()
        #: When the thread wakes up next (monotonic), unless notified earlier.
        self._wake_at = math.inf
        self._thread = threading.Thread(target=self._run, name="buffylite-lease", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> "_LeaseRenewer":
        with cls._instance_lock:
            if cls._instance is None or cls._instance._pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def add(self, keeper: _LeaseKeeper) -> None:
        with self._changed:
            self._keepers.append(keeper)
            # Woken only when this lease falls due before the thread would wake anyway: a
            # run of short downloads then costs the thread no wake-up each (on a small
            # machine, each one took the interpreter away from the download).
            if keeper.due < self._wake_at:
                self._changed.notify()

    def discard(self, keeper: _LeaseKeeper) -> None:
        with self._changed:
            if keeper in self._keepers:
                self._keepers.remove(keeper)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [keeper for keeper in self._keepers if keeper.due <= now]
                if not due:
                    wait = max(min((keeper.due for keeper in self._keepers), default=now + 3600.0) - now, 0.001)
                    self._wake_at = now + wait
                    self._changed.wait(wait)
                    self._wake_at = -math.inf  # awake: whatever is added is seen before the next wait
                    continue
                for keeper in due:
                    keeper.renewing.acquire()  # (released below, after the renewal)
            for keeper in due:
                try:
                    with self._changed:
                        active = keeper in self._keepers
                    if active:
                        keeper.renew()
                finally:
                    keeper.renewing.release()
                with self._changed:
                    keeper.due = time.monotonic() + keeper.lease_sec / 3
                    if keeper.lost and keeper in self._keepers:
                        self._keepers.remove(keeper)  # nothing left to renew


class _Sink:
    """Receives the body of one download: hashes it and stores it chunk by chunk. Each
    chunk commits in its own short transaction (so a crash loses at most the chunk in
    memory), and only while this download still owns its lease."""

    def __init__(self, store: _Store, claim: _Claim, hash_type: str, progress, keeper: _LeaseKeeper):
        self._store = store
        self._claim = claim
        self._hash_type = hash_type
        self._progress = progress
        self._keeper = keeper
        self.content_id: int | None = None
        self.hasher = hashlib.new(hash_type)
        self.offset = 0            # bytes received (stored + buffered)
        self.received_now = 0      # bytes received by this process (for stats)
        self.total: int | None = None
        #: Version columns to write with the first chunk (what the response headers said):
        #: a small body never needs a transaction of its own for them.
        self.pending_begin: dict | None = None
        #: May a body smaller than one chunk stay in memory until it is published?
        #: (Not when a validator must read it from the cache first.)
        self.keep_small_in_memory = False
        self._buffer = bytearray()
        self._next_seq = 0

    def load_partial(self, content_id: int) -> None:
        """Adopt the stored partial content of a dead download: re-hash what is stored
        (the hash must cover the whole content) and continue after it."""
        self.content_id = content_id
        for data in self._store.iter_chunks(content_id):
            self.hasher.update(data)
            self.offset += len(data)
            self._next_seq += 1

    def restart(self) -> None:
        """Drop everything received so far (the origin sent a full body again)."""
        if self.content_id is not None:
            self._store.empty_partial_content(self._claim, self.content_id)
        self.hasher = hashlib.new(self._hash_type)
        self.offset = 0
        self._buffer.clear()
        self._next_seq = 0

    def write(self, data: bytes) -> None:
        if self._keeper.lost:
            raise _LeaseLost()
        self.hasher.update(data)
        self._buffer += data
        self.offset += len(data)
        self.received_now += len(data)
        if len(self._buffer) >= DEFAULT_CHUNK_SIZE_BYTES:
            self.flush()
        if self._progress is not None:
            self._progress(self.offset, self.total)

    def small_body(self) -> bytes | None:
        """The whole body, when it arrived without a chunk being stored and may stay in
        memory until published; else None (the caller flushes)."""
        if self.keep_small_in_memory and self.content_id is None:
            return bytes(self._buffer)
        return None

    def flush(self) -> None:
        """Store the buffered bytes as the next chunk, in one transaction."""
        self.content_id = self._store.append_chunk(
            self._claim, self.content_id, self._hash_type, self._next_seq,
            bytes(self._buffer) if self._buffer else None, self.pending_begin)
        self.pending_begin = None
        if self._buffer:
            self._next_seq += 1
        self._buffer.clear()


@dataclasses.dataclass(frozen=True)
class _RetrySettings:
    """How a download retries: attempts after the first, and the cap on any wait (seconds)."""

    retries: int
    max_wait: float


@dataclasses.dataclass
class _DownloadResult:
    """How one download ended, the one form it travels in from the transfer to its
    settlement: ``kind`` "completed" (``received`` is the new content), "not_modified"
    (``received`` holds the 304's headers) or "failed" (``failure`` says why)."""

    kind: str
    received: "_Completed | _NotModified | None" = None
    failure: "_DownloadFailure | None" = None


class _Transfer:
    """One due download: attempts with backoff, Retry-After, resume with Range +
    If-Range, and the conditional GET of ``when_remote_changed``. Returns a _Completed
    or _NotModified, or raises _DownloadFailure once retrying cannot help."""

    def __init__(self, http: "_HttpClient", store: _Store, retry: "_RetrySettings", call: _FetchCall,
                 claim: _Claim, sink: _Sink, conditional_from):
        self._http = http
        self._store = store
        self._retry = retry
        self._call = call
        self._claim = claim
        self._sink = sink
        self._conditional = (json.loads(conditional_from.content_attributes or "{}")
                             if conditional_from is not None else None)
        self._started = _now()
        self._attributes: dict = {}
        self._cache_headers: dict | None = None  # the origin's caching headers, when it sent a body
        self._validators: dict | None = None   # what If-Range may use, when resumable
        if claim.resume is not None:
            self._attributes = json.loads(claim.resume.content_attributes or "{}")
            self._validators = json.loads(claim.resume.resume_from)
            sink.load_partial(claim.resume.content_id)

    def run(self):
        identity = self._call.identity
        headers = dict(identity.send_headers)
        if identity.body_kind == "json" and not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        url = identity.request_url()
        if self._validators and self._sink.offset and self._sink.offset == self._validators.get("total"):
            return self._complete()  # A dead download had stored every byte already.
        retries = self._retry.retries if self._call.retries is None else self._call.retries
        attempt, status_code = 0, None
        while True:
            try:
                # The claim checked the identity's sensitive names; later attempts read them again.
                strip = identity.sensitive_sets[0] if attempt == 0 else \
                    SENSITIVE_HEADERS | self._store.sensitive_names()["headers"]
                response = self._http.send(identity.method, url, self._headers_for_attempt(headers),
                                           identity.body, timeout=self._call.timeout, strip_on_redirect=strip)
                try:
                    result = self._receive(response)
                except BaseException:
                    # Part of a body may still be unread: this connection cannot be reused.
                    response.close()
                    raise
                finally:
                    response.release_conn()
                return result
            except _AttemptError as error:
                status_code = error.status_code or status_code
                # The origin or the network failed (not the content): later fetches back off.
                backs_off = error.retryable or (error.status_code or 0) >= 500
                if not error.retryable or attempt >= retries:
                    raise self._failure(str(error), status_code, error.cause, backs_off,
                                        error.retry_after) from error
                if error.retry_after is not None and error.retry_after > self._retry.max_wait:
                    raise self._failure(
                        f"{error}; the origin asks to wait {error.retry_after:.0f} s, more than "
                        f"max_retry_wait {self._retry.max_wait:g} s", status_code, error.cause,
                        backs_off, error.retry_after) from error
                wait = (error.retry_after if error.retry_after is not None
                        else _backoff_seconds(attempt, self._retry.max_wait))
                log.info("Attempt %d for %s failed (%s); retrying in %.1f s.", attempt + 1, identity.url,
                         identity.scrub(str(error)), wait)
                time.sleep(wait)  # The lease keeper renews the lease meanwhile.
                attempt += 1

    def _headers_for_attempt(self, base: dict) -> dict:
        headers = dict(base)
        if self._sink.offset and self._validators:
            headers["Range"] = f"bytes={self._sink.offset}-"
            headers["If-Range"] = self._validators.get("etag") or self._validators["last_modified"]
        elif self._conditional is not None:
            if self._conditional.get("etag"):
                headers["If-None-Match"] = self._conditional["etag"]
            if self._conditional.get("last_modified_datetime_utc"):
                moment = ResponseContentAttributes.model_validate(self._conditional).last_modified_datetime_utc
                headers["If-Modified-Since"] = email.utils.format_datetime(
                    moment.astimezone(dt.timezone.utc), usegmt=True)
        return headers

    def _receive(self, response: urllib3.BaseHTTPResponse):
        status, sink = response.status, self._sink
        if status == 304 and self._conditional is not None and not sink.offset:
            return _NotModified(_caching_headers(response.headers))
        if status in RETRY_STATUS_CODES:
            raise _AttemptError(f"HTTP {status} {response.reason or ''}".strip(), status_code=status,
                                retryable=True,
                                retry_after=_retry_after_seconds(response.headers.get("Retry-After")))
        if status == 416 and sink.offset:
            _, total = self._parse_content_range(response.headers.get("Content-Range"))
            if total == sink.offset:
                return self._complete()  # Nothing was missing.
            sink.restart()
            raise _AttemptError(f"the origin cannot resume at byte {sink.offset}", status_code=416,
                                retryable=True)
        if status == 206 and sink.offset:
            start, total = self._parse_content_range(response.headers.get("Content-Range"))
            if start != sink.offset:
                sink.restart()
                raise _AttemptError(f"the origin resumed at byte {start}, not {sink.offset}", retryable=True)
            sink.total = total
            self._cache_headers = _caching_headers(response.headers)
        elif 200 <= status < 300 and status != 206:
            if sink.offset:
                sink.restart()  # The origin sent the whole content again (If-Range did not match).
            self._begin(response)
            self._cache_headers = _caching_headers(response.headers)
        else:
            raise _AttemptError(f"HTTP {status} {response.reason or ''}".strip(), status_code=status,
                                retryable=False)
        probe_excess = sink.total is not None
        try:
            while True:
                amount, remaining = READ_SIZE_BYTES, (sink.total or 0) - sink.offset
                if probe_excess and remaining > 1:
                    amount = min(amount, remaining - 1)  # Stop one byte short of the end ...
                elif probe_excess and remaining == 1:  # ... to look past it.
                    probe_excess = False
                    if _has_excess_body(response, remaining):
                        raise _AttemptError("the body is longer than its Content-Length", retryable=False)
                data = _read_available(response, amount)
                if not data:
                    break
                sink.write(data)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _AttemptError(f"the connection broke after {sink.offset} bytes ({exc})",
                                retryable=True, cause=exc) from exc
        if sink.total is not None and sink.offset != sink.total:
            raise _AttemptError(f"the body ended after {sink.offset} of {sink.total} bytes", retryable=True)
        return self._complete()

    def _complete(self) -> _Completed:
        sink = self._sink
        body = sink.small_body()
        if body is None:
            sink.flush()
        self._attributes["content_size_bytes"] = sink.offset
        return _Completed(sink.content_id, sink.hasher.hexdigest(), sink.offset, self._attributes,
                          self._stats(), self._cache_headers, body)

    @staticmethod
    def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
        """``bytes START-END/TOTAL`` -> (START, TOTAL or None); (None, None) when malformed."""
        match = _CONTENT_RANGE.fullmatch((value or "").strip())
        if match is None:
            return None, None
        return int(match[1]), (int(match[2]) if match[2] != "*" else None)

    def _begin(self, response: urllib3.BaseHTTPResponse) -> None:
        """A full body starts: record its attributes and whether it could be resumed.

        Whatever the origin sent is either used or ignored here: a value that could not
        be sent back (a validator with a line break) or read back later (a date past
        year 9999, a length in other digits than 0-9) is dropped, never stored.
        """
        try:
            self._read_attributes(response)
        except (ValueError, TypeError, LookupError, UnicodeError, OverflowError) as exc:
            raise _AttemptError(f"the origin's headers cannot be used: {exc}", retryable=False,
                                cause=exc) from exc
        # Written with the first chunk (or by the publishing transaction, for a small body).
        self._sink.pending_begin = {
            "status": "in_progress", "content_attributes": json.dumps(self._attributes),
            "resume_from": json.dumps(self._validators) if self._validators else None,
            "download_stats": json.dumps(self._stats())}

    def _read_attributes(self, response: urllib3.BaseHTTPResponse) -> None:
        """Content attributes, expected length and resume validators from the headers."""
        headers = response.headers

        def usable(name: str, limit: int = 8192) -> str | None:
            value = headers.get(name)
            return value if value and len(value) <= limit and _is_sendable_header_value(value) else None

        media_type, etag, disposition = usable("Content-Type"), usable("ETag"), usable("Content-Disposition")
        last_modified = _parse_http_date(usable("Last-Modified"))
        final_url = getattr(response, "url", None) or self._call.identity.url
        self._attributes = ResponseContentAttributes(
            media_type=media_type, etag=etag,
            last_modified_datetime_utc=_to_datetime(last_modified),
            filename=_guess_filename(disposition, final_url,
                                     (media_type or "").split(";")[0].strip() or None),
            content_disposition=disposition,
        ).model_dump(mode="json")
        length = (headers.get("Content-Length") or "").strip()
        self._sink.total = (int(length) if _CONTENT_LENGTH.fullmatch(length)
                            and not headers.get("Content-Encoding") else None)
        resumable = _is_resumable(headers) and (etag or last_modified is not None)
        self._validators = ({"etag": etag if not (etag or "").startswith("W/") else None,
                             "last_modified": usable("Last-Modified") if last_modified is not None else None,
                             "total": self._sink.total}
                            if resumable else None)
        if self._validators is not None and not (self._validators["etag"] or self._validators["last_modified"]):
            self._validators = None

    def _stats(self) -> dict:
        duration = max(_now() - self._started, 1e-9)
        return ResponseDownloadStats(
            downloaded_bytes=self._sink.offset, avg_bytes_per_sec=self._sink.received_now / duration,
            download_running_duration_sec=duration, download_start_time_unix_ts=self._started,
            total_bytes_to_download=self._sink.total, state="in_progress").model_dump(mode="json")

    def _failure(self, message: str, status_code: int | None, cause, starts_backoff: bool = False,
                 retry_after: float | None = None) -> _DownloadFailure:
        self._sink.restart()  # A failed download keeps no content.
        identity = self._call.identity
        if identity.secrets and cause is not None and identity.scrub(str(cause)) != str(cause):
            cause = identity.scrub(str(cause))  # The network's words may echo a secret.
        return _DownloadFailure(identity.scrub(message), status_code=status_code, cause=cause,
                                stats=self._stats(), starts_backoff=starts_backoff,
                                retry_after=retry_after)



class Cache:
    """A versioning HTTP download cache in one SQLite file.

    ``Cache(path=None, *, timeout=30.0, retries=5, max_retry_wait=120.0,
    download_lease_sec=30.0, sensitive_headers=(), sensitive_params=(), failure_backoff_sec=60.0,
    read_only=False, seeds=(), lockfile=None, user_agent=None)``

    - ``path``: the cache file. ``None`` means ``$BUFFYLITE_CACHE`` if set, else the
      platform's user cache directory (Linux ``$XDG_CACHE_HOME`` or ``~/.cache``, macOS
      ``~/Library/Caches``, Windows ``%LOCALAPPDATA%``) / ``buffylite/cache.sqlite3``.
      Missing directories are created.
    - ``timeout``: seconds for connecting and for each read (or a ``urllib3.Timeout``);
      more than 0, at most one day.
    - ``retries``: retries after the first attempt of a download (0 = try once, at most 100), on
      connection and read errors and on 429, 500, 502, 503, 504. Waits grow
      exponentially from 0.5 s; ``Retry-After`` (seconds or HTTP date) is honoured.
    - ``max_retry_wait``: no wait exceeds this many seconds; a ``Retry-After`` asking
      for more ends the retries at once (the download fails, and ``fetch`` falls back
      to the cached version).
    - ``failure_backoff_sec``: after a due download fails (network error, 5xx, 429),
      later fetches of that request serve the cached version at once (outcome
      ``stale``, ``stale_reason`` saying why) for this many seconds, without touching
      the network; a longer ``Retry-After`` extends it (by at most a day). Remembered in
      the file, so it holds across processes and restarts. ``0`` disables it; a fetch
      with ``refresh=True``, or of a request with nothing cached, tries anyway.
    - ``download_lease_sec``: an in-flight download holds a lease of this length,
      renewed while bytes arrive. Other threads and processes see it and do not
      download the same request at the same time; once it expires (the process
      died) the download is taken over or reclaimed.
    - ``sensitive_headers``: header names, beyond Authorization, Proxy-Authorization
      and Cookie, whose values never reach the file in clear (a salted digest is
      stored; they still make requests distinct). The names are remembered in the
      file, so every Cache on it treats them the same way, and they are stripped from
      a redirect to another origin.
    - ``sensitive_params``: query parameter names (``api_key``...) treated the same
      way, in ``params=`` and in the URL's query string: sent, stored as salted
      digests, shown as ``***``. Remembered by the file too.
    - ``read_only``: open the file for reading only. Automatic when this process cannot
      write the file or its folder (read-only media, another user's file). Reads work;
      ``fetch`` serves what is cached as ``offline`` does (CacheFileError when a download
      would be needed); anything that writes raises CacheFileError saying so.
    - ``seeds``: paths of read-only caches (e.g. shipped with an app). When this cache
      holds no version a fetch accepts, the newest suitable version of a seed is copied
      into this cache and served (outcome ``cached``): an app starts offline at once.
    - ``lockfile``: a lockfile written by ``lock()`` (None: ``$BUFFYLITE_LOCKFILE``, if
      set). Every fetch of a locked request returns content with the locked hash and
      nothing else: a cached version with that hash without asking the origin, else a
      download that must match (IntegrityError naming the URL and both hashes).
    - ``user_agent``: default ``buffylite/<version>``; no NUL, CR or LF, Latin-1 only.

    Every number is finite and in a stated range (durations at most
    ``MAX_DURATION_SEC``, network waits at most ``MAX_NETWORK_WAIT_SEC``); anything else
    is an InvalidRequestError before the file is touched. URL passwords and sensitive
    values are masked (``***``) in messages, logs and reprs.

    Everything is stored in the one file: requests with their cache configuration,
    versions with their state, pins, leases and tags, and content, once per distinct
    hash, in 1 MiB chunks. One Cache may be shared by threads; any number of Cache
    objects in any number of processes may use the same file. Use it as a context
    manager, or call ``close()``.

    Errors: ``CacheFileError`` when the file is not a buffylite cache, is corrupt or
    comes from a newer version; ``InvalidRequestError`` for bad arguments.
    """

    def __init__(self, path: str | os.PathLike | None = None, *,
                 timeout: float | urllib3.Timeout = DEFAULT_TIMEOUT_SEC,
                 retries: int = DEFAULT_RETRIES,
                 max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_SEC,
                 download_lease_sec: float = DEFAULT_DOWNLOAD_LEASE_SEC,
                 sensitive_headers: tuple[str, ...] | list[str] = (),
                 sensitive_params: tuple[str, ...] | list[str] = (),
                 failure_backoff_sec: float = DEFAULT_FAILURE_BACKOFF_SEC,
                 read_only: bool = False,
                 seeds: tuple[str | os.PathLike, ...] | list = (),
                 lockfile: str | os.PathLike | None = None,
                 user_agent: str | None = None):
        # Every argument is checked before the file is touched: a rejected Cache writes nothing.
        timeout = _check_timeout(timeout)
        self._retries = _check_count("retries", retries, minimum=0, maximum=MAX_RETRIES)
        self._max_retry_wait = _check_seconds("max_retry_wait", max_retry_wait, maximum=MAX_NETWORK_WAIT_SEC)
        self._download_lease_sec = _check_seconds("download_lease_sec", download_lease_sec,
                                                  maximum=MAX_NETWORK_WAIT_SEC, allow_zero=False)
        self._failure_backoff_sec = _check_seconds("failure_backoff_sec", failure_backoff_sec,
                                                   maximum=MAX_BACKOFF_SEC)
        header_names = self._check_names("sensitive_headers", sensitive_headers, header=True)
        param_names = self._check_names("sensitive_params", sensitive_params, header=False)
        if user_agent is not None:
            _check_header("User-Agent", user_agent)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InvalidRequestError(f"path must be a str or os.PathLike, not {type(path).__name__}.")
        if isinstance(path, str) and "\x00" in path:
            raise InvalidRequestError("path must not contain a NUL character.")
        location = os.fspath(path) if path is not None else os.environ.get("BUFFYLITE_CACHE") or None
        _refuse_url_location(location or "")
        if _is_postgres_location(location):
            # Messages, reprs and stats() show the URL without its password.
            self._location, self.path = location, _masked_location(location)
        else:
            self.path = pathlib.Path(path).expanduser() if path is not None else _default_cache_path()
            self._location = self.path
        seeds, self._lockfile = _check_portability_options(seeds, lockfile)
        self._locked = _read_lockfile(self._lockfile) if self._lockfile is not None else None
        # What the lockfile names without a value was secret where it was written: it is
        # matched, and kept, as such here too.
        self._locked_names = _lockfile_sensitive_names(self._locked)
        header_names |= self._locked_names[0]
        param_names |= self._locked_names[1]
        self._store = _open_store(self._location, read_only=bool(read_only))
        try:
            self._seeds = _Seeds(seeds)
            if header_names:
                self._store.remember_sensitive_names("headers", header_names)
            if param_names:
                self._store.remember_sensitive_names("params", param_names)
        except BaseException:
            self._store.close()
            raise
        self._http = _HttpClient(timeout, user_agent or f"buffylite/{__version__}")
        # An unclosed Cache that is garbage-collected still releases its connections
        # (every thread's) and its HTTP pool; the finaliser holds no reference to self.
        self._finalizer = weakref.finalize(self, _release_cache_resources, self._store, self._http,
                                           self._seeds)
        self._plain_identities: dict[tuple, _Identity] = {}
        self._parsed_configurations: dict[str, RequestCacheConfiguration] = {}
        self._cron_started: set[int] = set()
        self._cron_lock = threading.Lock()

    @staticmethod
    def _check_names(option: str, names, *, header: bool) -> set[str]:
        """Sensitive header or parameter names -> lower-case set; InvalidRequestError if bad."""
        if isinstance(names, (str, bytes)) or not isinstance(names, (tuple, list, set, frozenset)):
            raise InvalidRequestError(f"{option} must be a sequence of names, not {type(names).__name__}.")
        checked = set()
        for name in names:
            if not isinstance(name, str) or not name or (header and not _TOKEN.fullmatch(name)) or (
                    not header and (not name.isprintable() or len(name) > 1000)):
                raise InvalidRequestError(f"{option} contains {name!r}, which is not a valid "
                                          f"{'header' if header else 'query parameter'} name.")
            checked.add(name.lower())
        return checked

    @property
    def _sensitive(self) -> frozenset[str]:
        """Sensitive header names (lower-case): the built-in ones plus those the file remembers."""
        return SENSITIVE_HEADERS | self._store.sensitive_names()["headers"]

    @property
    def _sensitive_params(self) -> frozenset[str]:
        """Sensitive query parameter names (lower-case) the file remembers."""
        return self._store.sensitive_names()["params"]

    @staticmethod
    def _per_call_transfer_options(retries, timeout) -> tuple[int | None, urllib3.Timeout | None]:
        """Check fetch()'s ``retries`` and ``timeout`` like the Cache's; None keeps the Cache's."""
        if retries is not None:
            retries = _check_count("retries", retries, minimum=0, maximum=MAX_RETRIES)
        if timeout is not None:
            timeout = _check_timeout(timeout)
            if not isinstance(timeout, urllib3.Timeout):
                timeout = urllib3.Timeout(connect=timeout, read=timeout)
        return retries, timeout

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r})"

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the HTTP pool and the database connections of every thread (and of
        the seed caches).

        A Cache that is never closed releases them when it is garbage-collected.
        """
        self._finalizer()

    # --- identities and loading -------------------------------------------------

    def _identity(self, url, method="get", params=None, headers=None, body=None,
                  group=DEFAULT_GROUP, *, fresh: bool = True) -> _Identity:
        sets = self._store.sensitive_names(fresh=fresh)["sets"]
        sensitive, sensitive_params = sets
        if params or headers or body is not None:
            return _Identity(url, method, params, headers, body, group, salt=self._store.salt,
                             sensitive=sensitive, sensitive_params=sensitive_params)
        # The plain case (URL, method, group) is memoised: identities are immutable. The
        # sensitive names are part of the key: another Cache may add some to the file.
        memo_key = (url, method, group, sets)
        if not (isinstance(url, str) and isinstance(method, str) and isinstance(group, str)):
            return _Identity(url, method, None, None, None, group, salt=self._store.salt,
                             sensitive=sensitive)  # (raises InvalidRequestError)
        identity = self._plain_identities.get(memo_key)
        if identity is None:
            identity = _Identity(url, method, None, None, None, group, salt=self._store.salt,
                                 sensitive=sensitive, sensitive_params=sensitive_params)
            if len(self._plain_identities) >= IDENTITY_MEMO_SIZE:
                self._plain_identities.clear()
            self._plain_identities[memo_key] = identity
        return identity

    def _response(self, row, url: str, chain: list[str], outcome: str | None = None) -> Response:
        """Build the public object for a version row; ``chain`` is the request's ready
        versions in ascending order (for previous/next)."""
        try:
            return self._response_of(row, url, chain, outcome)
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"Version {getattr(row, 'version', '?')!r} (row {getattr(row, 'id', '?')}) of {url} in the "
                f"cache {self.path} is damaged and cannot be read: {type(exc).__name__}.",
                path=self.path) from exc

    def _response_of(self, row, url: str, chain: list[str], outcome: str | None) -> Response:
        stored = _stored_response_fields(row)
        previous_version = next_version = None
        if row.status == "ready":
            index = bisect.bisect_left(chain, row.version)
            previous_version = chain[index - 1] if index > 0 else None
            next_version = chain[index + 1] if index + 1 < len(chain) else None
        # Every Response owns its mutable parts; the datetimes and strings are immutable.
        fields = {**stored, "url": url, "previous_version": previous_version, "next_version": next_version,
                  "tags": list(stored["tags"]), "content_attributes": _copy_of(stored["content_attributes"]),
                  "download_stats": _copy_of(stored["download_stats"]), "outcome": outcome}
        return _trusted_response(fields, {"_cache": self, "_content_id": row.content_id})

    def _responses(self, rows: list, url: str, ready_rows: list, outcome: str | None = "cached"):
        chain = sorted(row.version for row in ready_rows)
        return [self._response(row, url, chain, outcome) for row in rows]

    def _configuration_of(self, request_row) -> RequestCacheConfiguration:
        """The request row's stored configuration, parsed once per distinct text: most
        requests of a cache share a few configurations, so a fresh process touching many
        URLs parses each of them once. Shared: callers must not modify it."""
        text = request_row.cache_configuration
        configuration = self._parsed_configurations.get(text) if isinstance(text, str) else None
        if configuration is None:
            try:
                configuration = RequestCacheConfiguration.model_validate_json(text)
            except _DAMAGE_ERRORS as exc:
                raise _DamagedValueError(
                    f"The stored cache configuration of {request_row.url!r} (request {request_row.id}) in "
                    f"the cache {self.path} is damaged and cannot be read.", path=self.path) from exc
            if isinstance(text, str):
                if len(self._parsed_configurations) >= PARSED_CONFIGURATIONS_KEPT:
                    self._parsed_configurations.clear()
                self._parsed_configurations[text] = configuration
        return configuration

    # --- fetch: argument validation ------------------------------------------------

    def fetch(self, url: str, *, method: str = "get", params: dict | None = None,
              headers: dict | None = None, body: dict | bytes | str | None = None,
              group: str = DEFAULT_GROUP, description: str | None = None,
              documentation_link: str | None = None,
              cache_configuration: RequestCacheConfiguration | dict | None = None,
              validation_hash_type: str | None = None, expected_hash: str | None = None,
              prefer_cached: bool = True, prefer_version: str | None = None,
              prefer_tag: str | None = None, prefer_pinned: bool | None = None,
              force_version: str | None = None, force_tag: str | None = None,
              force_pinned: bool | None = None, offline: bool | None = None,
              pin_for: float | None = None, as_of: dt.datetime | None = None,
              validator: Callable[[Response], None] | None = None,
              progress: Callable[[int, int | None], None] | None = None,
              refresh: bool = False, stale_if_error: bool = True,
              retries: int | None = None,
              timeout: float | urllib3.Timeout | None = None) -> Response:
        """Return a version of ``url``'s content, downloading it when the strategy says so.

        Identity: ``method`` ("get", "post", "put"; any case), ``params`` (dict, encoded
        into the query string), ``headers`` (dict), ``body`` (dict sent as JSON, bytes or
        str) and ``group`` make a request distinct. ``description`` and
        ``documentation_link`` are stored with it.

        Caching: ``cache_configuration`` (a RequestCacheConfiguration or its dict) is
        stored with the request and replaces a stored one; ``None`` keeps the stored one
        (default: ``when_remote_changed()``, 2 unpinned and 10 pinned versions kept).
        ``validation_hash_type``: hashlib algorithm for content hashes (default sha256).

        Choice of version: ``force_version``/``force_tag``/``force_pinned``
        never download and raise NotCachedError when nothing matches; ``prefer_*`` are
        soft (dropped in the order pinned, tag, version); ``as_of`` (aware datetime)
        returns what was current then, without network; ``expected_hash``
        ("sha256:<hex>" or "<hex>") admits only content with that hash; ``offline``
        (None: ``$BUFFYLITE_OFFLINE``) never touches the network; ``prefer_cached``:
        while another thread or process downloads this request, return the cached
        version at once instead of waiting; ``pin_for``: seconds of lease put on the
        returned version in the transaction that chooses it.

        Callbacks: ``validator(response)`` sees a new download before it becomes ready
        and rejects it by raising; ``progress(downloaded_bytes, total_or_None)`` is
        called as bytes arrive and cancels the download by raising (the exception
        reaches the caller; the partial content is kept for a later resume).

        Control of this call: ``refresh=True`` makes a download due now,
        whatever the strategy and the failure backoff (a conditional GET when the cached
        version has an ETag or Last-Modified: a 304 confirms it). ``stale_if_error=False``
        raises FetchError when the due download fails (the failed attempt is still
        recorded), and during the failure backoff, instead of serving the cached version.
        ``retries`` (0 to 100) and ``timeout`` (seconds, or a ``urllib3.Timeout``)
        replace the Cache's settings for this call; ``None`` keeps them.

        Returns a Response whose ``outcome`` is ``downloaded``, ``not_modified``,
        ``duplicate``, ``stale``, ``offline`` or ``cached``; a ``stale`` one carries
        ``stale_reason``.

        Raises InvalidRequestError (bad arguments; nothing written), NotCachedError
        (nothing suitable cached and no download allowed), FetchError (the download
        failed and nothing suitable is cached), IntegrityError (the download does not
        match ``expected_hash`` and no cached version does), CacheFileError.
        """
        for name, value in (("description", description), ("documentation_link", documentation_link)):
            if value is not None and not _is_storable_text(value):
                raise InvalidRequestError(f"{name} must be a str of valid Unicode text without NUL "
                                          f"characters, or None, not {value!r}."[:300])
        for name, value in (("prefer_pinned", prefer_pinned), ("force_pinned", force_pinned)):
            if value is not None and not isinstance(value, bool):
                raise InvalidRequestError(f"{name} must be True, False or None, not {value!r}.")
        identity = self._identity(url, method, params, headers, body, group, fresh=False)
        call = _FetchCall(
            identity=identity, description=description, documentation_link=documentation_link,
            configuration=self._coerce_configuration(cache_configuration),
            hash_type=_check_hash_type(validation_hash_type) if validation_hash_type else None,
            prefer_cached=bool(prefer_cached),
            prefer_version=self._check_version_string("prefer_version", prefer_version),
            prefer_tag=self._check_tag(prefer_tag, "prefer_tag"), prefer_pinned=prefer_pinned,
            force_version=self._check_version_string("force_version", force_version),
            force_tag=self._check_tag(force_tag, "force_tag"), force_pinned=force_pinned,
            offline=_is_offline_from_env() if offline is None else bool(offline),
            pin_for=None if pin_for is None else _check_seconds("pin_for", pin_for, allow_zero=False),
            as_of=self._check_as_of(as_of), validator=validator, progress=progress,
            refresh=bool(refresh), stale_if_error=bool(stale_if_error))
        call.retries, call.timeout = self._per_call_transfer_options(retries, timeout)
        if expected_hash is not None:
            call.expected_algorithm, call.expected_hash = _parse_expected_hash(expected_hash)
        for name in ("validator", "progress"):
            if getattr(call, name) is not None and not callable(getattr(call, name)):
                raise InvalidRequestError(f"{name} must be callable.")
        if call.configuration is not None:
            self._require_strategy_support(call.configuration)
        if self._locked is not None or self._seeds or self._store.read_only:
            response = self._fetch_portably(call)  # lockfile, seeds, read-only
        else:
            response = self._fetch(call)
        if call.expected_hash is not None:  # reads of this object check the bytes
            response.__pydantic_private__["_expected_hash"] = call.expected_hash
        return response

    @staticmethod
    def _require_strategy_support(configuration: RequestCacheConfiguration) -> None:
        if configuration.recaching_strategy.strategy_name == "cron" and _optional_extra("croniter") is None:
            raise InvalidRequestError(
                "The cron strategy needs the optional extra: pip install 'buffylite[cron]'.")

    def _check_expected_hash(self, call: _FetchCall, request, *, known: bool = False) -> None:
        """The expected digest must be of the request's hash type, and of its length.
        A new request takes the expected hash's algorithm as its hash type. ``known``: a
        ready version has that digest, so it is valid even when the request's hash type
        changed since that version was stored."""
        if known:
            return
        stored = request.validation_hash_type if request is not None else None
        hash_type = call.hash_type or stored or call.expected_algorithm or DEFAULT_HASH_TYPE
        if call.expected_algorithm and call.expected_algorithm != hash_type:
            raise InvalidRequestError(
                f"expected_hash uses {call.expected_algorithm}, but {call.identity.url} is hashed "
                f"with {hash_type}; pass a {hash_type} digest.")
        if len(call.expected_hash) != hashlib.new(hash_type).digest_size * 2:
            raise InvalidRequestError(f"expected_hash {call.expected_hash!r} is not a {hash_type} digest "
                                      f"({hashlib.new(hash_type).digest_size * 2} hex digits).")
        if request is None:
            call.hash_type = hash_type

    @staticmethod
    def _coerce_configuration(value) -> RequestCacheConfiguration | None:
        if value is None or isinstance(value, RequestCacheConfiguration):
            return value
        if isinstance(value, dict):
            try:
                return RequestCacheConfiguration.model_validate(value)
            except pydantic.ValidationError as exc:
                raise InvalidRequestError(f"Invalid cache_configuration: {_validation_message(exc)}") from None
        raise InvalidRequestError("cache_configuration must be a RequestCacheConfiguration or a dict, "
                                  f"not {type(value).__name__}.")

    @staticmethod
    def _check_tag(tag: str | None, name: str = "tag") -> str | None:
        if tag is None:
            return None
        try:
            return _tag_adapter().validate_python(tag)
        except pydantic.ValidationError as exc:
            raise InvalidRequestError(f"{name} {tag!r} is not 2-64 characters of A-Z, a-z, 0-9, _ "
                                      "and -.") from exc

    @staticmethod
    def _check_version_string(name: str, value: str | None) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or len(value) != 20 or not (value.isascii() and value.isdigit()):
            raise InvalidRequestError(f"{name} {value!r} is not a 20-digit version string.")
        return value

    @staticmethod
    def _check_as_of(value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise InvalidRequestError(f"as_of must be a datetime, not {type(value).__name__}.")
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidRequestError("as_of must be timezone-aware (e.g. datetime.now(timezone.utc)).")
        return value

    # --- fetch: deciding ---------------------------------------------------------------

    def _fetch(self, call: _FetchCall) -> Response:
        # A version validated from this moment on is as fresh as a download this call
        # would start: single flight serves it instead of sending a second GET.
        started = self._store.now()
        while True:
            request, ready = self._store.request_and_ready_rows(call.identity.key)
            now = self._store.now()
            eligible = [row for row in ready
                        if call.expected_hash is None or row.content_hash_hex == call.expected_hash]
            if call.expected_hash is not None:
                self._check_expected_hash(call, request, known=bool(eligible))
            if request is not None:
                self._update_request_settings(call, request)
            # Hard choices and time travel never touch the network.
            if call.is_hard_choice:
                return self._serve(call, request, ready, "offline" if call.offline else "cached",
                                   hard=True)
            configuration = call.configuration or (
                self._configuration_of(request) if request is not None else RequestCacheConfiguration())
            strategy = configuration.recaching_strategy
            newest = ready[0] if ready else None
            if call.offline:
                return self._serve(call, request, ready, "offline")
            self._require_strategy_support(configuration)
            plan = ("serve" if call.locked else self._stored_plan(strategy, newest, request, now)) \
                if eligible else "download"
            if call.refresh and eligible and not call.locked:
                plan = "conditional" if _has_validators(newest) else "download"
            if plan == "serve":
                return self._serve(call, request, ready, "cached")
            # A download is due, but a recent failure of the origin says not to try yet.
            if eligible and not call.refresh and self._is_backing_off(request, now):
                return self._serve_during_backoff(call, request, ready, now)

            # A download (or a conditional check) is due: claim it, unless someone else runs it.
            seen = (newest.id, newest.validated_unix) if newest is not None else None
            try:
                claim = self._claim(call, strategy, started, seen, absent=request is None)
            except _SensitiveNamesChanged:
                call.identity = self._identity(*call.identity.arguments)
                continue
            except CacheFileError as exc:
                if not _is_out_of_space(exc):
                    raise
                return self._cannot_store(call, exc)
            if claim.settled:
                # Another thread or process made a suitable version ready meanwhile.
                request, ready = self._store.request_and_ready_rows(call.identity.key)
                return self._serve(call, request, ready, "cached")
            if claim.other_row_id is None:
                return self._run_download(call, claim, newest if plan == "conditional" else None)
            if call.prefer_cached and eligible:
                return self._serve(call, request, ready, "cached")
            settlement = self._await_download(claim.request_id, claim.other_row_id)
            if settlement is not None:
                return self._after_other_download(call, claim.request_id, settlement)
            # That download vanished (a 304 check) or died: decide again on fresh state.

    def _is_backing_off(self, request, now: float) -> bool:
        """Is the request inside a failure backoff recorded in the file? A damaged
        end (not a number, or beyond what a backoff can last) counts as none."""
        until = getattr(request, "backoff_until_unix", None)
        return bool(self._failure_backoff_sec and isinstance(until, float)
                    and now < until <= now + MAX_BACKOFF_SEC)

    def _serve_during_backoff(self, call: _FetchCall, request, ready: list, now: float) -> Response:
        """Serve the cached version as "stale" without touching the network, because a
        recent download failed (or raise FetchError when the call refuses stale content)."""
        try:
            failure = json.loads(request.backoff_failure or "{}")
            failure = failure if isinstance(failure, dict) else {}
        except ValueError:
            failure = {}  # damaged: the backoff end alone still holds
        error = str(failure.get("error") or "unknown error")
        failed_at = failure.get("failed_unix")
        ago = f" {max(0.0, now - failed_at):.0f} s ago" if isinstance(failed_at, (int, float)) else ""
        until = _to_datetime(request.backoff_until_unix).isoformat(timespec="seconds")
        reason = (f"the download failed{ago} ({error}); no new attempt before {until} "
                  "(failure backoff)")
        if not call.stale_if_error:
            status_code = failure.get("status_code")
            raise FetchError(f"Downloading {request.url} failed{ago}: {error}; no new attempt before "
                             f"{until} (failure backoff; refresh=True tries now), and stale content "
                             "was refused.", url=request.url, cause=error,
                             status_code=status_code if isinstance(status_code, int) else None)
        response = self._serve(call, request, ready, "stale")
        response.stale_reason = reason
        log.warning("Not downloading %s: %s; serving the cached version %s.", request.url, reason,
                    response.version, extra={"buffylite_stale": True})
        return response

    def _stored_plan(self, strategy, newest, request, now: float) -> str:
        """``_plan`` on values read from the file: a damaged one makes this request unusable."""
        cron_first_run = False
        if newest is not None and strategy.strategy_name == "cron" and strategy.run_at_start:
            with self._cron_lock:  # a download in this Cache is the cron strategy's run at start
                cron_first_run = request.id not in self._cron_started
                self._cron_started.add(request.id)
        try:
            return _plan(strategy, newest, now, cron_first_run=cron_first_run)
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"Version {getattr(newest, 'version', '?')!r} of {request.url!r} in the cache {self.path} "
                f"is damaged and cannot be read: {type(exc).__name__}.", path=self.path) from exc

    def _choose(self, call: _FetchCall, ready: list, now: float, *, hard: bool = False):
        """The newest ready row satisfying the call's choices, or None."""
        try:
            return _choose_version(call, ready, now, hard=hard)
        except _DAMAGE_ERRORS as exc:
            damaged = "?"
            for row in ready:  # name the row that holds the damage
                try:
                    _matches(row, tag="", pinned=True, now=now)
                    _to_datetime(row.cached_unix)
                except _DAMAGE_ERRORS:
                    damaged = row.version
                    break
            raise _DamagedValueError(
                f"Version {damaged!r} of {call.identity.url} in the cache {self.path} is damaged and "
                f"cannot be read: {type(exc).__name__}.", path=self.path) from exc

    def _serve(self, call: _FetchCall, request, ready: list, outcome: str, *, hard: bool = False):
        """Return a cached version without downloading (leasing it first if pin_for)."""
        if request is None and call.as_of is not None:
            self._refuse_removed_at(call, None)
        if request is None:
            raise NotCachedError(f"{call.identity.url} is not in the cache {self.path}"
                                 + (" (offline)." if call.offline else "."))
        if call.pin_for is not None:
            with self._store.writing():
                ready = self._store.ready_rows(request.id)
                chosen = self._choose(call, ready, self._store.now(), hard=hard)
                if chosen is not None:
                    self._store.extend_lease(chosen, call.pin_for)
        else:
            chosen = self._choose(call, ready, self._store.now(), hard=hard)
        if call.as_of is not None:
            self._refuse_removed_at(call, chosen)
        if chosen is None:
            raise NotCachedError(self._nothing_matches(call))
        return self._responses([chosen], request.url, ready, outcome)[0]

    def _refuse_removed_at(self, call: _FetchCall, chosen) -> None:
        """``as_of``: raise NotCachedError when the version that was newest at that moment
        has been removed since (GC, delete, corruption), rather than answer with ``chosen``,
        an older version that was not current then."""
        if call.force_tag is not None or call.force_pinned is not None:
            return  # A removed version's tags and pins are not kept: it cannot be compared.
        rows = self._store.removed_versions(call.identity.key, chosen.version if chosen is not None else "")
        for row in rows:
            if call.force_version is not None and row.version != call.force_version:
                continue
            if call.expected_hash is not None and row.hash_hex != call.expected_hash:
                continue
            # Compared as shown: microsecond datetimes.
            if _to_datetime(row.cached_unix) <= call.as_of < _to_datetime(row.removed_unix):
                raise NotCachedError(
                    f"The version of {call.identity.url} current at {call.as_of.isoformat()} was "
                    f"{row.version} ({row.hash_type}:{row.hash_hex}, {row.size_bytes} bytes); it was "
                    f"removed from {self.path} at {_to_datetime(row.removed_unix).isoformat()} "
                    f"({row.reason}).")

    def _nothing_matches(self, call: _FetchCall) -> str:
        wanted = [f"{name}={getattr(call, name)!r}" for name in
                  ("force_version", "force_tag", "force_pinned", "expected_hash")
                  if getattr(call, name) is not None]
        if call.as_of is not None:
            wanted.append(f"as_of={call.as_of.isoformat()}")
        return (f"No cached version of {call.identity.url} matches "
                f"{', '.join(wanted) or 'the request'} in {self.path}.")

    def _update_request_settings(self, call: _FetchCall, request) -> None:
        """Store a changed configuration / description / hash type passed to fetch()."""
        changes = self._setting_changes(call, request)
        if changes and not self._store.read_only:
            with self._store.writing():
                self._store.update_row("request", request.id, changes)

    @staticmethod
    def _setting_changes(call: _FetchCall, request) -> dict:
        changes = {}
        if call.configuration is not None:
            stored = call.configuration.model_dump_json()
            if stored != request.cache_configuration:
                changes["cache_configuration"] = stored
        for field, value in (("description", call.description),
                             ("documentation_link", call.documentation_link),
                             ("validation_hash_type", call.hash_type)):
            if value is not None and value != getattr(request, field):
                changes[field] = value
        return changes

    # --- fetch: single flight -------------------------------------------------------------

    def _claim(self, call: _FetchCall, strategy=None, started: float | None = None,
               seen: tuple | None = None, *, absent: bool = False) -> _Claim:
        try:
            return self._claim_of(call, strategy, started, seen, absent)
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"A stored version of {call.identity.url} in the cache {self.path} is damaged and "
                f"cannot be read: {type(exc).__name__}.", path=self.path) from exc

    def _claim_of(self, call: _FetchCall, strategy, started: float | None, seen: tuple | None,
                  absent: bool) -> _Claim:
        """Create the request if new and take the download lease, in one transaction.

        The decision to download is taken again here, on the rows this transaction
        sees: when another thread or process made a ready version meanwhile that this
        call may serve (validated since ``started``, or fresh per ``strategy``; ``seen``
        is the newest ready version's (id, validated time) the first decision saw), the
        claim is ``settled`` and nothing is downloaded. A live lease on another row
        means someone else is downloading: report it. An abandoned row with resumable
        partial content is taken over. ``absent``: the request was not stored a moment
        ago, so creating it is tried first (and the read skipped when that succeeds).
        """
        identity = call.identity
        owner = f"{os.getpid()}:{threading.get_ident()}:{secrets.token_hex(6)}"
        with self._store.writing():
            # Checked where the request row is written: a name another Cache declared
            # since the identity was built must not be stored in clear.
            if self._store.sensitive_names()["sets"] != identity.sensitive_sets:
                raise _SensitiveNamesChanged()
            now = self._store.now()
            request = None if absent else self._store.request_by_identity(identity.key)
            lease = {"lease_owner": owner, "lease_expires_unix": now + self._download_lease_sec}
            if request is None:
                configuration = call.configuration or RequestCacheConfiguration()
                columns = dict(
                    identity_key=identity.key, url=identity.url, http_method=identity.method,
                    group_name=identity.group, http_header_fields=_canonical_json(identity.stored_headers),
                    http_query_params=_canonical_json(identity.stored_params) if identity.params else None,
                    body_kind=identity.body_kind, http_request_body=identity.body,
                    description=call.description, documentation_link=call.documentation_link,
                    validation_hash_type=call.hash_type or DEFAULT_HASH_TYPE,
                    cache_configuration=configuration.model_dump_json(), created_unix=now)
                request_id = self._store.insert_row("request", columns, unless_present=True)
                if request_id is None:  # another thread or process stored it meanwhile
                    request = self._store.request_by_identity(identity.key)
            if request is None:
                # A new request has no versions: no other download to look for, no
                # version string to follow.
                version = {"request_id": request_id, "version": _next_version_string(now, None),
                           "status": "wait", "request_unix": now, **_VERSION_DEFAULTS, **lease}
                row_id = self._store.add_download_row(request_id, version["version"], now, lease)
                record = types.SimpleNamespace(
                    **{**dict.fromkeys(_REQUEST_COLUMNS), **columns, "id": request_id})
                row = types.SimpleNamespace(**{**dict.fromkeys(_VERSION_COLUMNS), **version, "id": row_id})
                return _Claim(request_id, row_id, owner, request=record, first_row=row)
            else:
                request_id = request.id
                changes = self._setting_changes(call, request)
                if changes:
                    self._store.update_row("request", request_id, changes)
                if started is not None and self._settled_meanwhile(call, request, strategy, started,
                                                                   seen, now):
                    return _Claim(request_id, settled=True)
            in_flight = self._store.in_flight_rows(request_id)
            for row in in_flight:
                if _lease_is_live(self.path, row, self._download_lease_sec):
                    return _Claim(request_id, other_row_id=row.id)
            for row in in_flight:
                # A row whose resume data is damaged is not resumed (GC reclaims it).
                if row.content_id is not None and row.resume_from and _is_resumable_row(row):
                    self._store.update_row("version", row.id, lease)
                    return _Claim(request_id, row.id, owner, resume=row)
            newest = self._store.newest_version_string(request_id)
            row_id = self._store.add_download_row(request_id, _next_version_string(now, newest), now, lease)
            return _Claim(request_id, row_id, owner)

    def _is_abandoned_at(self, now: float) -> Callable[[Any], bool]:
        """GC's judgement of an in-flight row: dead when released, or when this process
        has watched its heartbeat stand still for the lease time; without such an
        observation only when its stored lease end is long past by ``now``
        (``ABANDONED_WITHOUT_OBSERVATION_LEASES`` lease lengths)."""
        lease_sec = self._download_lease_sec

        def abandoned(row) -> bool:
            if _lease_released(row):
                return True
            silence = _lease_silence(self.path, row)
            if silence is not None:
                return silence >= lease_sec + LEASE_SILENCE_MARGIN_SEC
            return row.lease_expires_unix <= now - ABANDONED_WITHOUT_OBSERVATION_LEASES * lease_sec
        return abandoned

    def _settled_meanwhile(self, call: _FetchCall, request, strategy, started: float, seen,
                           now: float) -> bool:
        """Inside the claiming transaction: is there a ready version this call may serve
        without downloading? Only a change since the first decision can say so: the
        newest one counts when it was validated (downloaded, re-downloaded identical,
        or confirmed by a 304) since the call started, or when the strategy now finds
        it fresh."""
        ready = self._store.ready_rows(request.id)
        if not ready or not any(call.expected_hash is None or row.content_hash_hex == call.expected_hash
                                for row in ready):
            return False
        newest = ready[0]
        if seen == (newest.id, newest.validated_unix):
            return False  # Nothing changed: the first decision stands.
        if (newest.validated_unix or 0.0) > started:
            return True
        return strategy is not None and self._stored_plan(strategy, newest, request, now) == "serve"

    def _await_download(self, request_id: int, row_id: int) -> dict | None:
        """Wait, polling with backoff, until another download ends; return how it ended
        (its settlement), or None when its lease expired (its process died)."""
        pause = WAIT_POLL_MIN_SEC
        while True:
            row, settlement = self._store.download_state(request_id, row_id)
            if row is None or row.status not in IN_FLIGHT_STATUSES:
                try:
                    settlement = json.loads(settlement) if settlement else None
                    if (isinstance(settlement, dict) and settlement.get("row_id") == row_id
                            and {"outcome", "error", "status_code", "hash_mismatch"} <= settlement.keys()):
                        return settlement
                except _DAMAGE_ERRORS:
                    pass  # A damaged settlement tells nothing: decide again on the rows.
                return None  # Reclaimed, or settled and since overwritten: decide again.
            if not isinstance(row.lease_expires_unix, (int, float, type(None))) \
                    or not _lease_is_live(self.path, row, self._download_lease_sec):
                return None
            time.sleep(pause)
            pause = min(pause * 1.5, WAIT_POLL_MAX_SEC)

    def _after_other_download(self, call: _FetchCall, request_id: int, settlement: dict) -> Response:
        """Return what the download another thread or process just settled gives this call."""
        request, ready = self._store.request_and_ready_rows(call.identity.key)
        eligible = [row for row in ready
                    if call.expected_hash is None or row.content_hash_hex == call.expected_hash]
        if not eligible and request is not None and call.expected_hash is not None and ready:
            raise IntegrityError(f"The content of {call.identity.url} does not match the expected "
                                 f"hash {call.expected_hash} and no cached version does.")
        if settlement["outcome"] == "failed":
            if eligible and call.stale_if_error:
                response = self._serve(call, request, ready, "stale")
                response.stale_reason = f"downloading failed: {settlement['error']}"
                log.warning("Downloading %s failed (%s); serving the cached version %s.",
                            call.identity.url, settlement["error"], response.version,
                            extra={"buffylite_stale": True})
                return response
            if settlement["hash_mismatch"] and call.expected_hash is not None:
                raise IntegrityError(f"The content downloaded from {call.identity.url} does not match "
                                     f"the expected hash ({settlement['error']}) and no cached version does.")
            raise FetchError(f"Downloading {call.identity.url} failed: {settlement['error']}.",
                             url=call.identity.url, status_code=settlement["status_code"],
                             cause=settlement["error"])
        response = self._serve(call, request, ready, "cached")
        newest_id = ready[0].id if ready else None
        if settlement["outcome"] == "downloaded" and response.id == settlement["row_id"]:
            response.outcome = "downloaded"
        elif settlement["outcome"] in ("duplicate", "not_modified") and response.id == newest_id:
            response.outcome = settlement["outcome"]
        return response

    # --- fetch: downloading -----------------------------------------------------------------

    def _run_download(self, call: _FetchCall, claim: _Claim, conditional_from) -> Response:
        """Download for a claimed row, then publish, record the failure, or keep the
        partial content (cancelled), and return what the call's choices say to return."""
        request = claim.request
        if request is None:
            request = self._store.request_by_id(claim.request_id)
        with self._cron_lock:  # A download in this Cache is the cron strategy's run at start.
            self._cron_started.add(claim.request_id)
        keeper = _LeaseKeeper(self._store, claim, self._download_lease_sec)
        sink = _Sink(self._store, claim, request.validation_hash_type, call.progress, keeper)
        sink.keep_small_in_memory = call.validator is None
        try:
            try:
                result = self._download_and_check(call, claim, request, sink, conditional_from)
            finally:
                keeper.stop()
            return self._finish(call, claim, request, result)
        except _LeaseLost:
            log.warning("The download of %s was taken over by another process; waiting for it.",
                        request.url)
            return self._fetch(call)
        except CacheFileError as exc:
            if not _is_out_of_space(exc):
                self._abandon(claim, sink)
                raise
            self._discard(claim)
            return self._cannot_store(call, exc)
        except BaseException:
            # Cancelled (progress raised, KeyboardInterrupt...): keep what arrived for a resume.
            self._abandon(claim, sink)
            raise

    def _download_and_check(self, call: _FetchCall, claim: _Claim, request, sink: _Sink,
                            conditional_from) -> _DownloadResult:
        """Run the transfer, then the content checks (expected hash, validator); how the
        download settles."""
        try:
            result = _Transfer(self._http, self._store, _RetrySettings(self._retries, self._max_retry_wait),
                               call, claim, sink, conditional_from).run()
            if isinstance(result, _NotModified):
                return _DownloadResult("not_modified", result)
            if call.expected_hash is not None and result.hash_hex != call.expected_hash:
                raise _DownloadFailure(f"hash mismatch: expected {call.expected_hash}, got {result.hash_hex}",
                                       stats=result.stats, cause="hash mismatch")
            if call.validator is not None and not self._is_duplicate_of_newest(claim.request_id, result):
                self._run_validator(call, claim, request, result)
            return _DownloadResult("completed", result)
        except _DownloadFailure as failure:
            failure.stats.setdefault("downloaded_bytes", sink.offset)
            return _DownloadResult("failed", failure=failure)

    def _is_duplicate_of_newest(self, request_id: int, result: _Completed) -> bool:
        ready = self._store.ready_rows(request_id)
        return bool(ready) and ready[0].content_hash_hex == result.hash_hex

    def _run_validator(self, call: _FetchCall, claim: _Claim, request, result: _Completed) -> None:
        """Show the new, complete content to the user's validator before it is published."""
        # The version string the content will be published under is given now, so the
        # validator sees the version fetch() returns (and the one a failure is recorded as).
        with self._store.writing():
            row = self._store.owned_row(claim)
            if row is None:
                raise _LeaseLost()
            row.version = claim.version = self._next_version_of(request.id, row.id, self._store.now())
            self._store.update_row("version", row.id, {"version": row.version})
        row.content_attributes = json.dumps(result.attributes)
        row.content_hash_hex = result.hash_hex
        candidate = self._response(row, request.url, [])
        candidate._content_id = result.content_id
        try:
            call.validator(candidate)
        except Exception as exc:  # noqa: BLE001 - any exception from the validator rejects the content
            raise _DownloadFailure(f"rejected by validator: {exc}", stats=result.stats,
                                   cause=exc) from exc

    def _cannot_store(self, call: _FetchCall, exc: CacheFileError) -> Response:
        """The disk is full: serve the newest suitable cached version (stale, with a
        WARNING naming the cause), else raise a CacheFileError saying why."""
        request, ready = self._store.request_and_ready_rows(call.identity.key)
        chosen = self._choose(call, ready, self._store.now()) if request is not None and call.pin_for is None else None
        if chosen is not None:
            log.warning("Cannot store the download of %s (%s); serving the cached version %s.",
                        call.identity.url, exc, chosen.version)
            return self._responses([chosen], request.url, ready, "stale")[0]
        raise CacheFileError(f"Cannot store {call.identity.url} in {self.path}: the disk is full. "
                             "Free some space and fetch again.", path=self.path) from exc

    def _discard(self, claim: _Claim) -> None:
        """Best effort, after the disk filled up: delete this download's row and partial
        content. If even that cannot be written, the lease lapses on its own and gc()
        reclaims the row later."""
        try:
            self._store.discard_download(claim)
        except BuffyliteError as exc:
            log.debug("Discarding the download failed too (%s); gc() will reclaim it.", exc)

    def _abandon(self, claim: _Claim, sink: _Sink) -> None:
        """Store what is buffered and let the lease lapse now, keeping the partial content
        so a later fetch can resume it (or gc() reclaim it)."""
        with contextlib.suppress(Exception):
            sink.flush()
        with contextlib.suppress(Exception):
            self._store.give_up_lease(claim)

    def _finish(self, call: _FetchCall, claim: _Claim, request, result: _DownloadResult) -> Response:
        """Settle a download in one transaction: publish it (ready or duplicate), record the
        304 or the failure, collect garbage for the request, then choose the version to
        return and lease it (pin_for), so no GC can slip in between."""
        if result.kind == "completed" and claim.first_row is not None:
            try:  # The first version of a request this call created: nothing to read back.
                return self._settle(call, claim, request, result, first=True)
            except _Crowded:
                pass  # The lease was lost or another version appeared: the general way.
        return self._settle(call, claim, request, result, first=False)

    def _settle(self, call: _FetchCall, claim: _Claim, request, result: _DownloadResult, *,
                first: bool) -> Response:
        kind, completed, failure = result.kind, result.received, result.failure
        with self._store.writing():
            now = self._store.now()
            # One read gives the request as stored now and every version row: the
            # ownership check, the version string, the newest ready one, and GC's input.
            # Each UPDATE below is mirrored on these records (``_set``). A first version
            # is published on the records the claim wrote, by an UPDATE that checks they
            # still hold (``publish_first_version``).
            stored_request, rows = (claim.request, [claim.first_row]) if first else \
                self._store.request_and_versions(request.id)
            row = next((candidate for candidate in rows if candidate.id == claim.row_id), None)
            if stored_request is None or row is None or row.lease_owner != claim.owner:
                raise _LeaseLost()
            request = stored_request
            others = max((other.version for other in rows if other.id != row.id), default=None)
            keep = claim.version
            final = {"version": keep if keep is not None and (others is None or keep > others)
                     else _next_version_string(now, others),
                     "lease_owner": None, "lease_expires_unix": None, "resume_from": None}
            ready = [candidate for candidate in rows if candidate.status == "ready"]
            newest = ready[0] if ready else None

            def update(record, **changes) -> None:
                self._store.update_row("version", record.id, changes)
                _set(record, changes)

            if kind == "not_modified":
                self._store.delete_version(row.id)
                rows.remove(row)
                if newest is not None:
                    # A 304 updates the stored caching headers with those it carries (RFC 9111 section 4.3.4).
                    update(newest, validated_unix=now, cache_headers=self._merged_cache_headers(
                        newest, completed.cache_headers if completed is not None else {}))
                outcome, settled_id = "not_modified", newest.id if newest else None
            elif kind == "completed":
                content_id = self._settle_content(row, request.validation_hash_type, completed)
                stats = dict(completed.stats, state="ready")
                if newest is not None and newest.content_id == content_id:
                    stats["state"] = "duplicate"
                    update(row, status="duplicate", content_id=content_id,
                           content_hash_hex=completed.hash_hex, cached_unix=now,
                           content_attributes=json.dumps(completed.attributes),
                           download_stats=json.dumps(stats), **final)
                    update(newest, validated_unix=now, cache_headers=json.dumps(completed.cache_headers)
                           if completed.cache_headers is not None else newest.cache_headers)
                    outcome, settled_id = "duplicate", newest.id
                else:
                    changes = dict(status="ready", content_id=content_id,
                                   content_hash_hex=completed.hash_hex, cached_unix=now,
                                   validated_unix=now, content_attributes=json.dumps(completed.attributes),
                                   cache_headers=json.dumps(completed.cache_headers)
                                   if completed.cache_headers is not None else None,
                                   download_stats=json.dumps(stats), **final)
                    if not first:
                        update(row, **changes)
                    elif self._store.publish_first_version(row.id, claim.owner, request.id, changes):
                        _set(row, changes)
                    else:
                        raise _Crowded()
                    outcome, settled_id = "downloaded", row.id
            else:
                stats = dict(failure.stats, state="failed", error=str(failure))
                partial = row.content_id
                update(row, status="failed", content_id=None, cached_unix=None,
                       download_stats=json.dumps(stats), **final)
                if partial is not None:
                    self._store.delete_unreferenced_contents({partial})
                outcome, settled_id = "stale", None
            rows.sort(key=lambda record: record.version, reverse=True)
            # Tell the calls waiting for this download how it ended (its row may be gone).
            settlement = {"row_id": row.id, "outcome": "failed" if kind == "failed" else outcome,
                          "error": str(failure) if failure else None,
                          "status_code": failure.status_code if failure else None,
                          "hash_mismatch": bool(failure and failure.cause == "hash mismatch")}
            self._store.update_row("request", request.id, {
                "last_settlement": json.dumps(settlement), **self._backoff_changes(kind, failure, now)})
            # Garbage collection of this request, before choosing what to return.
            freed = 0
            if kind != "not_modified":
                freed = self._collect_request(request.id, now, request=request, rows=rows)[1]
            ready = [candidate for candidate in rows if candidate.status == "ready"]
            chosen = self._choose(call, ready, now)
            if chosen is not None and call.pin_for is not None:
                self._store.extend_lease(chosen, call.pin_for)
        if freed:
            self._store.give_back_free_pages(checkpoint=False)

        if kind == "failed":
            return self._fall_back(call, request, chosen, ready, failure)
        if chosen is None:  # only possible when the new content fails expected_hash
            raise NotCachedError(self._nothing_matches(call))
        if chosen.id != settled_id:
            outcome = "cached"
        if kind == "completed":
            log.info("%s %s: version %s (%s bytes).", outcome, request.url, chosen.version,
                     completed.size)
        return self._responses([chosen], request.url, ready, outcome)[0]

    def _backoff_changes(self, kind: str, failure: _DownloadFailure | None, now: float) -> dict:
        """The request row's failure backoff after a download settled: started (or
        extended by Retry-After) by a failure of the origin or the network, ended by an
        answer from the origin, untouched by content rejected here (hash, validator)."""
        if kind in ("completed", "not_modified"):
            return {"backoff_until_unix": None, "backoff_failure": None}
        if failure is None or not failure.starts_backoff or not self._failure_backoff_sec:
            return {}
        wait = max(self._failure_backoff_sec, min(failure.retry_after or 0.0, MAX_RETRY_AFTER_BACKOFF_SEC))
        return {"backoff_until_unix": now + wait,
                "backoff_failure": json.dumps({"error": str(failure), "status_code": failure.status_code,
                                               "failed_unix": now})}

    @staticmethod
    def _merged_cache_headers(row, fresh: dict) -> str | None:
        """A version's stored caching headers updated with those of a 304 (RFC 9111 section 4.3.4)."""
        try:
            stored = json.loads(row.cache_headers or "{}")
        except ValueError:
            stored = {}
        merged = {**(stored if isinstance(stored, dict) else {}), **fresh}
        return json.dumps(merged) if merged else row.cache_headers

    def _next_version_of(self, request_id: int, row_id: int, now: float, keep: str | None = None) -> str:
        """The version string for row ``row_id`` of a request: ``keep`` (given earlier)
        while it is still newer than every other row's, else one for ``now`` after them.
        Runs inside the caller's write transaction."""
        others = self._store.newest_version_string(request_id, excluding=row_id)
        if keep is not None and (others is None or keep > others):
            return keep
        return _next_version_string(now, others)

    def _settle_content(self, row, hash_type: str, completed: _Completed) -> int:
        """Make the received content addressable by its hash, or drop it for the identical
        content already stored. Returns the content id the version points to."""
        if completed.body is not None:  # small: stored now, unless already stored
            return self._store.store_small_content(hash_type, completed.hash_hex, completed.body)
        return self._store.settle_chunked_content(row.id, hash_type, completed.hash_hex,
                                                  completed.content_id, completed.size)

    def _fall_back(self, call: _FetchCall, request, chosen, ready: list, failure: _DownloadFailure):
        """A due download failed: serve the newest suitable cached version (stale) unless the
        call refuses stale content, else raise."""
        if chosen is not None and call.stale_if_error:
            log.warning("Downloading %s failed (%s); serving the cached version %s.",
                        request.url, failure, chosen.version, extra={"buffylite_stale": True})
            response = self._responses([chosen], request.url, ready, "stale")[0]
            response.stale_reason = f"downloading failed: {failure}"
            return response
        if chosen is not None and failure.cause != "hash mismatch":
            raise FetchError(f"Downloading {request.url} failed: {failure}; the cached version "
                             f"{chosen.version} was not served (stale_if_error=False).", url=request.url,
                             status_code=failure.status_code, cause=failure.cause or str(failure))
        if failure.cause == "hash mismatch":
            raise IntegrityError(f"The content downloaded from {request.url} does not match the "
                                 f"expected hash ({failure}) and " + (
                                     "no cached version does." if chosen is None else
                                     f"the cached version {chosen.version} was not served "
                                     "(stale_if_error=False)."))
        raise FetchError(f"Downloading {request.url} failed: {failure}.", url=request.url,
                         status_code=failure.status_code, cause=failure.cause or str(failure))

    # --- garbage collection -------------------------------------------------------------

    def _collect_request(self, request_id: int, now: float, *, request, rows: list) -> tuple[dict, int]:
        """Apply the GC rules (see ``gc``) to the request ``request_id``, given that request
        and its version records read in the caller's write transaction (newest first); the store removes them inside that transaction, and the removed ones are
        taken out of ``rows``. A damaged stored value of the request raises
        _DamagedValueError (nothing is removed). Returns (removed per reason, bytes freed)."""
        removals = self._gc_removals(request, rows, now)
        if not removals:
            return {}, 0
        freed = self._store.collect_versions(request, removals, now)
        rows[:] = [row for row in rows if row.id not in removals]
        return self._removed_per_reason(removals), freed

    def _gc_removals(self, request, rows: list, now: float) -> dict:
        """What GC removes of one request (see ``_gc_selection``); _DamagedValueError when
        a stored value it needs cannot be read."""
        try:
            return _gc_selection(rows, self._configuration_of(request), now, self._is_abandoned_at(now))
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"A stored version of request {request.id} in the cache {self.path} is damaged and "
                f"cannot be read: {type(exc).__name__}.", path=self.path) from exc

    @staticmethod
    def _removed_per_reason(removals: dict) -> dict[str, int]:
        """How many of ``removals`` (``{version id: (row, reason)}``) each reason removes."""
        counts: dict[str, int] = {}
        for _, reason in removals.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def gc(self, url: str | None = None, *, method: str = "get", params: dict | None = None,
           headers: dict | None = None, body=None, group: str = DEFAULT_GROUP) -> GCReport:
        """Collect garbage for one request, or for every request when ``url`` is None.

        Keeps the newest ``max_cached_unpinned_versions`` ready unpinned versions, the
        newest ``max_cached_pinned_versions`` permanently pinned ones, every leased one
        and always the newest ready one; removes duplicate rows, failed rows but the
        newest per request, and downloads whose lease expired (their process died).
        Content nothing refers to any more is deleted and the file shrinks. The record of
        removed versions that ``as_of`` uses keeps, per request identity, every record it
        needs to answer honestly and the newest ``REMOVED_VERSION_RECORDS_KEPT`` of those
        that only name a removed version in its NotCachedError (older than every version
        still stored, or of a deleted request).
        Returns a GCReport (removed per reason, bytes freed, file size before/after).
        """
        report = GCReport(file_size_before=self._store.file_size())
        identity_key = None if url is None else self._identity(url, method, params, headers, body, group).key
        for request_id in self._store.request_ids(identity_key):
            # One short transaction per request keeps other writers moving.
            try:
                removals, freed = self._store.collect_request(request_id, self._gc_removals)
            except _DamagedValueError as exc:
                # Only this request cannot be collected; verify() reports it.
                log.warning("%s Not collected.", exc)
                continue
            for reason, count in self._removed_per_reason(removals).items():
                report.removed[reason] += count
            report.bytes_freed += freed
        # The record of removed versions (for as_of) stays bounded too; a deleted
        # request's records are kept by identity, so a full gc looks at all of them.
        if not self._store.read_only:
            self._store.prune_removed(REMOVED_VERSION_RECORDS_KEPT, identity_key)
        self._store.give_back_free_pages(checkpoint=True)
        report.file_size_after = self._store.file_size()
        _sweep_content_files(self)  # files and folders of content no longer stored
        return report

    # --- reading the cache --------------------------------------------------------------

    def _request_model(self, row) -> Request:
        try:
            return self._request_model_of(row)
        except _DamagedValueError:
            raise
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"The stored request {getattr(row, 'url', '?')!r} (request {getattr(row, 'id', '?')}) in "
                f"the cache {self.path} is damaged and cannot be read: {type(exc).__name__}.",
                path=self.path) from exc

    def _request_model_of(self, row) -> Request:
        return Request(
            id=row.id, url=row.url, http_method=row.http_method,
            http_header_fields=json.loads(row.http_header_fields or "{}"),
            http_query_params=json.loads(row.http_query_params) if row.http_query_params else None,
            http_request_body=_decode_body(row.body_kind, row.http_request_body),
            group_name=row.group_name, description=row.description,
            documentation_link=row.documentation_link, validation_hash_type=row.validation_hash_type,
            cache_configuration=self._configuration_of(row).model_copy(deep=True))  # the caller's own

    def get_request(self, url: str, *, method: str = "get", params: dict | None = None,
                    headers: dict | None = None, body=None, group: str = DEFAULT_GROUP) -> Request | None:
        """The stored Request for this identity, or None when it was never fetched."""
        identity = self._identity(url, method, params, headers, body, group)
        row = self._store.request_row(identity.key)
        return self._request_model(row) if row is not None else None

    def requests(self, group: str | None = None) -> list[Request]:
        """Every stored request (of ``group`` when given), oldest first."""
        found = []
        for row in self._store.request_rows(group):
            try:
                found.append(self._request_model(row))
            except _DamagedValueError as exc:
                # Only this request is unusable; verify() reports it.
                log.warning("%s Left out of requests().", exc)
        return found

    def versions(self, url: str, *, status: str | None = "ready", tag: str | None = None,
                 pinned: bool | None = None, method: str = "get", params: dict | None = None,
                 headers: dict | None = None, body=None, group: str = DEFAULT_GROUP) -> list[Response]:
        """The versions of a request, newest first.

        ``status``: one of wait, in_progress, ready, duplicate, failed; None for all.
        ``tag``: only versions carrying it. ``pinned``: True for permanently pinned or
        leased versions, False for the others. An unknown request gives an empty list.
        """
        if status is not None and status not in VERSION_STATUSES:
            raise InvalidRequestError(f"status must be one of {', '.join(VERSION_STATUSES)} or None, "
                                      f"not {status!r}.")
        tag = self._check_tag(tag)
        identity = self._identity(url, method, params, headers, body, group)
        request = self._store.request_row(identity.key)
        if request is None:
            return []
        rows = self._store.versions_of(request.id, status)
        ready = [row for row in rows if row.status == "ready"] if status in (None, "ready") \
            else self._store.ready_rows(request.id)
        now = self._store.now()
        try:
            rows = [row for row in rows if _matches(row, tag=tag, pinned=pinned, now=now)]
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(f"A stored version of {request.url} in the cache {self.path} is "
                                     f"damaged and cannot be read: {type(exc).__name__}.",
                                     path=self.path) from exc
        return self._responses(rows, request.url, ready)

    def get(self, url: str, version: str = "latest", *, method: str = "get", params: dict | None = None,
            headers: dict | None = None, body=None, group: str = DEFAULT_GROUP) -> Response:
        """A ready version of a request: ``"latest"`` (the newest) or a version string.

        Never touches the network. Raises NotCachedError when absent.
        """
        if version != "latest":
            self._check_version_string("version", version)
        identity = self._identity(url, method, params, headers, body, group)
        request = self._store.request_row(identity.key)
        ready = self._store.ready_rows(request.id) if request is not None else []
        chosen = next((row for row in ready if version in ("latest", row.version)), None)
        if chosen is None:
            raise NotCachedError(f"No ready version {version!r} of {identity.url} in {self.path}.")
        return self._responses([chosen], request.url, ready)[0]

    def stats(self) -> dict:
        """Counts and sizes: path, file_size_bytes (main file + WAL), requests, versions per
        status, content_bytes and unique_contents (each distinct content once), partial_bytes
        (downloads kept for resume), files_bytes and unpacked_bytes (held beside the cache file
        by ``as_file()`` and ``unpack()``), schema_version, database (its kind and version;
        for an SQLite file also sqlite_version)."""
        counts = self._store.counts()
        per_status = dict.fromkeys(VERSION_STATUSES, 0)
        for status, count in counts["versions"].items():
            if status in per_status:  # a damaged status is verify()'s to report
                per_status[status] = count
        return {"path": str(self.path), "file_size_bytes": self._store.file_size(),
                "requests": counts["requests"], "versions": per_status,
                "content_bytes": int(counts["content_bytes"]),
                "unique_contents": int(counts["unique_contents"]), "partial_bytes": int(counts["partial_bytes"]),
                "files_bytes": _bytes_under(_files_root(self)),
                "unpacked_bytes": _bytes_under(_unpacked_root(self)),
                "schema_version": self._store.schema_version(),
                "database": self._store.database_version(), **self._store.extra_stats()}

    # --- pins, leases, tags ---------------------------------------------------------------

    def _version_check(self, response: Response) -> Callable[[Any, str | None], None]:
        """For a change to the version ``response`` names: a check the store runs on the
        row with its id (see ``_Store._checked_version``), raising NotCachedError when
        that row is gone or is another version."""
        # A read-only cache refuses the change before the argument is looked at.
        self._store.require_writable()
        if not isinstance(response, Response):
            raise InvalidRequestError(f"Expected a Response, not {type(response).__name__}.")

        def check(row, url: str | None) -> None:
            # Row ids are per file: a Response of another cache may share this id with an
            # unrelated version here. The version and its request must be the same too.
            if row is not None and (row.version != response.version or row.request_id != response.request_id
                                    or url != response.url):
                # As when the id is free: that version is not in this cache.
                raise NotCachedError(f"Version {response.version} of {response.url} is not in {self.path} "
                                     "(a Response of another cache?).")
            if row is None:
                raise NotCachedError(f"Version {response.version} of {response.url} is no longer in {self.path}.")
        return check

    def _answer(self, row, url: str, ready: list) -> Response:
        """The Response a pin, lease or tag returns: the version as it is now."""
        return self._responses([row], url, ready, "cached")[0]

    def pin(self, response: Response, *, seconds: float | None = None) -> Response:
        """Pin a version: permanently (``seconds=None``; only the pinned GC may remove it,
        beyond ``max_cached_pinned_versions``) or as a lease of ``seconds`` that no GC
        touches while it runs (extending, never shortening, a running lease)."""
        if seconds is not None:
            seconds = _check_seconds("seconds", seconds, allow_zero=False)
        check = self._version_check(response)
        return self._store.pin_version(response.id, lease_sec=seconds, check=check, answer=self._answer)

    def unpin(self, response: Response) -> Response:
        """Clear the permanent pin and any lease of a version."""
        check = self._version_check(response)
        return self._store.unpin_version(response.id, check=check, answer=self._answer)

    @contextlib.contextmanager
    def lease(self, response: Response, seconds: float) -> Iterator[Response]:
        """Lease a version for the ``with`` block (at most ``seconds``); on exit put back
        the lease end that was there before, unless someone extended it further meanwhile."""
        seconds = _check_seconds("seconds", seconds, allow_zero=False)
        check = self._version_check(response)
        leased, before, ours = self._store.lease_version(response.id, seconds, check=check,
                                                         answer=self._answer)
        try:
            yield leased
        finally:
            self._store.end_lease(response.id, before, ours)

    def tag(self, response: Response, tag: str) -> Response:
        """Add a tag (2-64 characters of A-Z a-z 0-9 _ -) to a version."""
        tag = self._check_tag(tag)
        check = self._version_check(response)
        return self._store.add_tag(response.id, tag, check=check, answer=self._answer)

    def untag(self, response: Response, tag: str) -> Response:
        """Remove a tag from a version (no error if it was not there)."""
        tag = self._check_tag(tag)
        check = self._version_check(response)
        return self._store.remove_tag(response.id, tag, check=check, answer=self._answer)

    # --- maintenance ----------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the whole cache and report what is wrong; never "all intact" while
        something is.

        Runs the database's own checks (``PRAGMA integrity_check`` and
        ``foreign_key_check``) and reads every stored value back; what fails goes to
        ``problems``. Re-hashes every stored content: a version whose content no longer
        matches its hash (or cannot be read) leaves the chain and becomes ``failed`` with
        the error "content corrupted". ``corrupted`` lists every such version, found by
        this call or an earlier one, until it is deleted or collected.
        """
        report = VerifyReport()
        unmarked: list[int] = []  # corrupted contents a read-only cache cannot mark
        try:
            report.problems.extend(self._store.structural_problems())
        except CacheFileError as exc:
            report.problems.append(str(exc))
        try:
            contents = self._store.complete_contents()
        except CacheFileError as exc:
            report.problems.append(f"The list of contents cannot be read: {exc}")
            contents = []
        for content_id, hash_type, hash_hex, size in contents:
            try:
                intact = self._content_is_intact(content_id, hash_type, hash_hex, size)
            except NotCachedError:
                continue  # Deleted meanwhile: nothing to verify.
            except CacheFileError as exc:
                report.problems.append(f"Content {content_id} ({hash_type}:{hash_hex}) cannot be read: {exc}")
                intact = False
            report.checked += 1
            if not intact:
                try:
                    self._store.mark_content_corrupted(content_id)
                except CacheFileError as exc:
                    report.problems.append(f"Content {content_id} ({hash_type}:{hash_hex}) is corrupted "
                                           f"and cannot be marked so: {exc}")
                    unmarked.append(content_id)
        report.problems.extend(self._damaged_values())
        report.corrupted.extend(self._corrupted_versions(report.problems))
        # A read-only cache cannot mark them, but its report must still name them.
        report.corrupted.extend(self._versions_of_contents(unmarked, report.problems))
        return report

    def _listed_versions(self, listing: Callable[[], tuple[list, dict]], what: str,
                         problems: list[str]) -> list[Response]:
        """The versions ``listing()`` gives (rows, request id -> URL) as Responses, for
        verify(): what cannot be listed or read back goes to ``problems`` instead."""
        found = []
        try:
            rows, urls = listing()
        except CacheFileError as exc:
            problems.append(f"The {what} cannot be listed: {exc}")
            return found
        for row in rows:
            try:
                found.extend(self._responses([row], urls.get(row.request_id, "?"), [], "cached"))
            except CacheFileError as exc:
                problems.append(str(exc))
        return found

    def _versions_of_contents(self, content_ids: list[int], problems: list[str]) -> list[Response]:
        """The ready versions holding one of ``content_ids``, as stored."""
        if not content_ids:
            return []
        return self._listed_versions(lambda: self._store.ready_versions_holding(content_ids),
                                     "versions of corrupted contents", problems)

    def _content_is_intact(self, content_id: int, hash_type, hash_hex, size) -> bool:
        """Re-hash one content from one snapshot (a concurrent delete cannot look like
        corruption; it raises NotCachedError)."""
        try:
            hasher = hashlib.new(hash_type)
        except (TypeError, ValueError):
            return False  # A damaged algorithm name: the hash cannot be checked.
        length = 0
        try:
            with self._store.open_content(content_id) as stream:
                while data := stream.read(DEFAULT_CHUNK_SIZE_BYTES):
                    hasher.update(data)
                    length += len(data)
        except (IntegrityError, TypeError, ValueError):
            return False
        return hasher.hexdigest() == hash_hex and length == size

    def _corrupted_versions(self, problems: list[str]) -> list[Response]:
        """Every version marked "content corrupted" that is still stored."""
        return [response for response in self._listed_versions(
                    self._store.versions_marked_corrupted, "versions marked corrupted", problems)
                if response.download_stats.error == CORRUPTED_ERROR]

    def _damaged_values(self) -> list[str]:
        """Read every stored request and version back as the API would; name those that fail."""
        problems = []
        try:
            requests, versions = self._store.every_row()
        except CacheFileError as exc:
            return [f"The requests and versions cannot be read: {exc}"]
        urls = {}
        for row in requests:
            try:
                urls[row.id] = self._request_model(row).url
            except CacheFileError as exc:
                problems.append(str(exc))
        for row in versions:
            try:
                self._responses([row], urls.get(row.request_id, "?"), [], None)
            except CacheFileError as exc:
                problems.append(str(exc))
        return problems

    def refresh(self, group: str | None = None) -> list[RefreshResult]:
        """Apply each stored request's strategy now (as ``fetch`` would), for every request
        or those of ``group``. Requests whose sensitive header values are not stored
        cannot be replayed and report ``"error"``."""
        results = []
        for request in self.requests(group):
            result = RefreshResult(url=request.url, group=request.group_name, outcome="error")
            secret = [name for name, value in request.http_header_fields.items()
                      if name.lower() in self._sensitive and value.startswith("hmac-sha256:")]
            secret += [name for name, value in (request.http_query_params or {}).items()
                       if name.lower() in self._sensitive_params and "hmac-sha256:" in str(value)]
            with contextlib.suppress(ValueError):
                secret += [name for name, value in urllib.parse.parse_qsl(urllib.parse.urlsplit(request.url).query)
                           if name.lower() in self._sensitive_params and value == MASK]
            if secret:
                result.error = (f"cannot replay: the values of {', '.join(secret)} are not stored "
                                "in the cache; fetch it with them instead.")
                results.append(result)
                continue
            try:
                response = self.fetch(request.url, method=request.http_method,
                                      params=request.http_query_params,
                                      headers=request.http_header_fields or None,
                                      body=request.http_request_body, group=request.group_name)
                result.outcome, result.version = response.outcome, response.version
            except BuffyliteError as exc:
                result.error = str(exc)
            results.append(result)
        return results

    def delete(self, url: str, *, method: str = "get", params: dict | None = None,
               headers: dict | None = None, body=None, group: str = DEFAULT_GROUP) -> int:
        """Forget a request and all its versions; returns how many version rows were
        removed (0 for an unknown request). Content no other version uses is deleted."""
        identity = self._identity(url, method, params, headers, body, group)
        removed, freed = self._store.delete_request(identity.key)
        if freed:
            self._store.give_back_free_pages(checkpoint=False)
        return removed

    # --- reproducible and portable caches -------------------------------------------

    @property
    def read_only(self) -> bool:
        """True when this Cache opened its file read-only (asked for, or not writable)."""
        return self._store.read_only

    def _fetch_portably(self, call: _FetchCall) -> Response:
        """``fetch`` with the portability hooks: the lockfile's hash becomes the expected hash, a
        version missing here is taken from a seed, and a read-only cache serves what it
        holds as offline does."""
        entry = self._locked.get(_identity_lock_key(
            call.identity, self._sensitive | self._locked_names[0],
            self._sensitive_params | self._locked_names[1])) if self._locked is not None else None
        if entry is not None:
            algorithm, digest = _parse_expected_hash(entry.hash)
            if call.expected_hash is not None and call.expected_hash != digest:
                raise InvalidRequestError(
                    f"expected_hash {call.expected_hash} contradicts the lockfile {self._lockfile}, "
                    f"which locks {call.identity.url} to {entry.hash}.")
            call.expected_algorithm, call.expected_hash, call.locked = algorithm, digest, True
        if self._seeds and not self._store.read_only and call.as_of is None:
            seeded = self._serve_from_seeds(call)
            if seeded is not None:
                return seeded
        downloads_allowed = not call.offline and not call.is_hard_choice
        if self._store.read_only:
            call.offline = True
        try:
            return self._fetch(call)
        except NotCachedError as exc:
            if self._store.read_only and downloads_allowed:
                raise CacheFileError(
                    f"{call.identity.url} would have to be downloaded, but the cache {self.path} is "
                    f"read-only, so nothing can be stored ({exc})", path=self.path) from exc
            raise
        except IntegrityError as exc:
            if entry is None:
                raise
            raise IntegrityError(f"{call.identity.url} is locked to {entry.hash} by the lockfile "
                                 f"{self._lockfile}, but the origin now serves other content: {exc}") from exc

    def _serve_from_seeds(self, call: _FetchCall) -> Response | None:
        """When this cache holds no version the call accepts, copy the newest one a seed
        holds into this cache and serve it (outcome ``cached``); else None."""
        request, ready = self._store.request_and_ready_rows(call.identity.key)
        if self._choose(call, ready, self._store.now(), hard=call.is_hard_choice) is not None:
            return None
        has_secrets = call.identity.stored_headers != call.identity.send_headers
        for seed in self._seeds.stores():
            # Identities with secret values are keyed by each file's own salt.
            if has_secrets and seed.salt != self._store.salt:
                continue
            seed_request = seed.request_row(call.identity.key)
            seed_ready = [] if seed_request is None else seed.versions_of(seed_request.id, "ready")
            chosen = self._choose(call, seed_ready, self._store.now(), hard=call.is_hard_choice)
            if chosen is None:
                continue
            self._import_version(seed, seed_request, chosen)
            request, ready = self._store.request_and_ready_rows(call.identity.key)
            copied = next((row for row in ready if row.version == chosen.version), None)
            if copied is not None and copied.content_hash_hex == chosen.content_hash_hex:
                log.info("%s: version %s taken from the seed %s.", call.identity.url, chosen.version,
                         seed.path)
                return self._serve(call, request, ready, "cached", hard=call.is_hard_choice)
        return None

    def _import_version(self, source: _Store, request_row, version_row) -> bool:
        """Copy one ready version of ``source`` (with its request when this cache lacks it)
        into this cache, keeping its version string, pins, tags and times; content is
        stored once per hash and re-hashed while copied. Returns True when a version was
        added (False: this cache has that version string already, or it cannot be copied)."""
        columns = self._imported_request_columns(source, request_row, version_row)
        if columns is None:
            return False
        try:
            added, hash_type = self._store.import_version(
                source, columns, {name: getattr(version_row, name) for name in _IMPORTED_VERSION_COLUMNS},
                version_row.content_id)
        except _ContentMismatch as exc:
            log.warning("Not importing version %s of %s from %s: %s", version_row.version,
                        request_row.url, source.path, exc)
            return False
        if hash_type != request_row.validation_hash_type:
            log.warning("Not importing version %s of %s: it is hashed with %s, this cache "
                        "with %s.", version_row.version, request_row.url,
                        request_row.validation_hash_type, hash_type)
        return added

    def _imported_request_columns(self, source: _Store, request_row, version_row) -> dict | None:
        """The request row another file's request gets in this one, or None (logged) when
        the request or version cannot be imported. Both are parsed first: a damaged value
        is not copied into a healthy file. Values this file declares sensitive and the
        other file holds in clear are digested with this file's salt, so they never land
        here in clear; the other file's failure backoff is its own and is not copied."""
        try:
            model = self._request_model(request_row)
            self._response(version_row, request_row.url, [])
        except _DamagedValueError as exc:
            log.warning("Not importing version %s of %s from %s: a stored value there is damaged (%s).",
                        getattr(version_row, "version", "?"), getattr(request_row, "url", "?"),
                        source.path, type(exc.__cause__ or exc).__name__)
            return None
        columns = {name: getattr(request_row, name) for name in _REQUEST_COLUMNS
                   if name not in ("id", "last_settlement", "backoff_until_unix", "backoff_failure")}
        sensitive, sensitive_params = self._store.sensitive_names()["sets"]
        try:
            in_url = urllib.parse.parse_qsl(urllib.parse.urlsplit(model.url).query, keep_blank_values=True)
        except ValueError:
            in_url = []
        clear = ([name for name, value in model.http_header_fields.items()
                  if name.lower() in sensitive and not _is_digest(value)]
                 + [name for name, value in (model.http_query_params or {}).items()
                    if name.lower() in sensitive_params and _params_by_name({name: value})[name] is not None]
                 + [name for name, value in in_url if name.lower() in sensitive_params and value != MASK])
        if not clear:
            return columns
        problem = None
        if _has_digests(request_row) or MASK in model.url:
            problem = "it also holds values digested with the salt of that file"
        else:
            try:
                identity = _Identity(model.url, model.http_method, model.http_query_params,
                                     model.http_header_fields, model.http_request_body, model.group_name,
                                     salt=self._store.salt, sensitive=sensitive,
                                     sensitive_params=sensitive_params)
            except BuffyliteError as exc:
                problem = str(exc)
        if problem is not None:
            log.warning("Not importing %s (group %s) from %s: it holds %s in clear, which this cache "
                        "keeps secret, and %s.", request_row.url, request_row.group_name, source.path,
                        ", ".join(clear), problem)
            return None
        columns.update(identity_key=identity.key, url=identity.url,
                       http_header_fields=_canonical_json(identity.stored_headers),
                       http_query_params=_canonical_json(identity.stored_params) if identity.params else None)
        return columns

    def lock(self, path: str | os.PathLike | None, *, group: str | None = None,
             tag: str | None = None, pinned: bool | None = None) -> list[LockEntry]:
        """Write a lockfile: for each stored request (of ``group`` when given), the version
        it uses now, so that ``sync`` and ``Cache(lockfile=...)`` can reproduce it elsewhere.

        The version chosen is the newest ready one; with ``tag``, the newest carrying that
        tag; with ``pinned=True``, the newest pinned or leased one (``False``: the newest
        neither). Requests without such a version are left out. The file is JSON with
        sorted keys, one entry per request in a stable order, and no time of writing: the
        lockfile of an unchanged cache is byte-identical. Sensitive header values appear
        by name only (``null``); URLs never carry credentials.

        ``path``: where to write, as ``Response.save_to`` writes a path: a regular file (or
        nothing) is replaced atomically, a symlink is written through, a FIFO or a device is
        written into; None writes nothing. Returns the entries.
        Raises InvalidRequestError (bad tag), CacheFileError (cannot write ``path``).
        """
        tag = self._check_tag(tag)
        target = _check_path("path", path).expanduser() if path is not None else None
        if pinned is not None and not isinstance(pinned, bool):
            raise InvalidRequestError(f"pinned must be True, False or None, not {pinned!r}.")
        if group is not None and (not isinstance(group, str) or not group):
            raise InvalidRequestError(f"group must be a non-empty string, not {group!r}.")
        now = self._store.now()
        entries = []
        for request in self._store.request_rows(group):
            try:
                chosen = next((row for row in self._store.ready_rows(request.id)
                               if _matches(row, tag=tag, pinned=pinned, now=now)), None)
                if chosen is None:
                    continue
                size, hash_type = self._store.content_size_and_hash_type(chosen.content_id)
                entries.append(_lock_entry(request, chosen, size, hash_type))
            except _DAMAGE_ERRORS as exc:
                # Only this request is unusable (verify() reports it); the others are locked.
                log.warning("%s is left out of the lockfile: its stored values in the cache %s are damaged "
                            "(%s).", request.url, self.path, type(exc).__name__)
        entries.sort(key=_lock_entry_order)
        if target is not None:
            _write_atomically(target, _lockfile_text(entries).encode())
        return entries

    def sync(self, path: str | os.PathLike, *, offline: bool = False) -> SyncReport:
        """Make every entry of the lockfile at ``path`` present in this cache.

        An entry is ``present`` when a ready version of its request has the locked hash;
        otherwise it is downloaded and checked against that hash: ``downloaded`` when it
        matches, ``mismatched`` when the origin now serves other bytes (recorded as a
        failed version), ``missing`` when it cannot be had (``offline``, a read-only cache,
        a failed download, or sensitive header values the lockfile does not hold: fetch
        those with their headers under ``Cache(lockfile=...)``). Returns a SyncReport of URLs.
        Raises InvalidRequestError (unreadable lockfile), CacheFileError.
        """
        entries = _read_lockfile(path)
        offline = bool(offline) or self._store.read_only
        stored = self._requests_by_lock_key()
        report = SyncReport()
        for key, entry in sorted(entries.items(), key=lambda item: _lock_entry_order(item[1])):
            algorithm, digest = _parse_expected_hash(entry.hash)
            request_id = stored.get(key)
            if request_id is not None and any(row.content_hash_hex == digest
                                              for row in self._store.ready_rows(request_id)):
                report.present.append(entry.url)
                continue
            if (offline or any(value is None for value in entry.headers.values())
                    or any(value is None for value in (entry.params or {}).values())
                    or _lockfile_sensitive_names({key: entry})[1]):
                # (Values the lockfile does not hold cannot be sent: None or *** would be.)
                report.missing.append(entry.url)
                continue
            kind, body = _lock_entry_body(entry)
            try:
                self.fetch(entry.url, method=entry.method, params=entry.params,
                           headers=entry.headers or None, body=_decode_body(kind, body),
                           group=entry.group, expected_hash=f"{algorithm}:{digest}")
            except IntegrityError:
                report.mismatched.append(entry.url)
            except (FetchError, NotCachedError, InvalidRequestError) as exc:
                # (InvalidRequestError: the request is stored here with another hash type.)
                log.warning("Could not sync %s: %s", entry.url, exc)
                report.missing.append(entry.url)
            else:
                report.downloaded.append(entry.url)
        return report

    def _requests_by_lock_key(self) -> dict[str, int]:
        """Lock key -> request id, for every stored request whose values can be read."""
        return {key: row.id for row in self._store.request_rows()
                if (key := _stored_lock_key_or_none(row, self._store.path)) is not None}

    def backup(self, dest: str | os.PathLike, *, group: str | None = None,
               lockfile: str | os.PathLike | None = None) -> pathlib.Path:
        """Write a consistent, compact copy of this cache to ``dest`` and return its path.

        The copy is one snapshot (SQLite ``VACUUM INTO``) taken while other threads and
        processes go on using the cache; it is written beside ``dest`` and renamed into
        place, so ``dest`` is never a torn copy. With ``group`` and/or ``lockfile`` the copy
        keeps only the requests of that group and/or those the lockfile names (with just
        their locked versions), with their pins, tags and content; everything else is
        removed and the copy compacted. The copy is an ordinary cache file that also
        opens read-only (for shipping with an app, see ``Cache(seeds=...)``).

        Raises InvalidRequestError (``dest`` exists, unreadable lockfile), CacheFileError.
        """
        dest = _check_path("dest", dest).expanduser()
        if os.path.lexists(dest):
            raise InvalidRequestError(f"The backup destination {dest} already exists; remove it or "
                                      "choose another path.")
        if group is not None and (not isinstance(group, str) or not group):
            raise InvalidRequestError(f"group must be a non-empty string, not {group!r}.")
        locked = _read_lockfile(lockfile) if lockfile is not None else None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            handle, temp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial",
                                                 dir=dest.parent)
            os.close(handle)  # VACUUM INTO fills an empty file.
        except OSError as exc:
            raise CacheFileError(f"Cannot write the backup {dest}: {exc}.", path=dest) from exc
        temp = pathlib.Path(temp_name)
        try:
            if self._store.is_file:
                with self._store.reading():
                    _sqlite_snapshot_into(self._store.db, temp)
            else:
                self._copy_into_new_file(temp)
            copy = _SqliteStore(temp)
            try:
                if group is not None or locked is not None:
                    _keep_only(copy, group, locked)
                _sqlite_finish_copy(copy.db, compact=group is not None or locked is not None)
            finally:
                copy.close()
            _sqlite_remove_side_files(temp)
            with open(temp, "rb") as written:
                os.fsync(written.fileno())
            os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what a new cache gets.
            os.replace(temp, dest)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            _sqlite_remove_side_files(temp)
            if isinstance(exc, OSError):
                raise CacheFileError(f"Cannot write the backup {dest}: {exc}.", path=dest) from exc
            raise
        return dest

    def _copy_into_new_file(self, path: pathlib.Path) -> None:
        """Copy a cache that is not a file (a PostgreSQL schema) into a new SQLite cache
        file at ``path``: its salt first (so sensitive values stay matched), then every
        request with its ready versions, pins, tags and content, read from one snapshot."""
        store = _SqliteStore(path)
        try:
            store.replace_salt(self._store.salt)
        finally:
            store.close()
        with Cache(path) as copy:
            copy.import_from(self._location)

    def import_from(self, source: str | os.PathLike, *, group: str | None = None) -> int:
        """Merge the requests and ready versions of another cache (a file, or a PostgreSQL URL) into this one.

        Version strings, pins, leases and tags are kept; content already stored here (same
        hash) is not stored twice, and copied content is re-hashed on the way. A version
        string this cache already has for that request is skipped. Requests whose
        sensitive header values were digested with another file's salt cannot be matched
        to a fetch here and are skipped (with a warning), unless ``source`` is a copy of
        this cache. No garbage collection runs. ``group``: import only that group.

        Returns the number of versions added. Raises CacheFileError (unusable ``source``,
        read-only cache), InvalidRequestError.
        """
        if group is not None and (not isinstance(group, str) or not group):
            raise InvalidRequestError(f"group must be a non-empty string, not {group!r}.")
        self._store.require_writable()
        other = _open_store(source if _is_postgres_location(source) else
                            _check_path("source", source).expanduser(), read_only=True)
        added = 0
        try:
            if not other.is_file:  # one snapshot of a server's cache for the whole import
                with other.reading():
                    other.begin_snapshot(other.db)
            # What the other file keeps secret stays secret here.
            for kind, names in other.sensitive_names().items():
                if kind != "sets" and names:
                    self._store.remember_sensitive_names(kind, set(names))
            same_salt = other.salt == self._store.salt
            for request in other.request_rows(group):
                try:
                    has_digests = _has_digests(request)
                except _DAMAGE_ERRORS as exc:
                    log.warning("Not importing %s (group %s) from %s: its stored values are damaged (%s).",
                                request.url, request.group_name, other.path, type(exc).__name__)
                    continue
                if not same_salt and has_digests:
                    log.warning("Not importing %s (group %s): its sensitive header values are "
                                "digested with the salt of %s.", request.url, request.group_name, other.path)
                    continue
                rows = other.versions_of(request.id, "ready")[::-1]  # oldest first
                added += sum(self._import_version(other, request, row) for row in rows)
        finally:
            other.close()
        return added


# ---------------------------------------------------------------------------
# Portability: lockfiles, backups, imports, seeds
# ---------------------------------------------------------------------------
#
# A request is matched across cache files by its *lock key*: the identity without
# the values of sensitive headers, which each file digests with a salt of its own.
# Lockfiles use it, so a lockfile written from one cache applies to any other.


class LockEntry(_Model):
    """One request of a lockfile and the version it is locked to.

    ``headers`` holds sensitive headers by name only (value ``None``). ``body`` is the
    body as sent: a JSON value (``body_encoding="json"``), text (``"text"``) or base64
    of bytes (``"base64"``). ``hash`` is ``"<algorithm>:<hex digest>"``.
    """

    url: str
    method: Literal["get", "post", "put"] = "get"
    params: Optional[dict[str, Any]] = None
    headers: dict[str, Optional[str]] = Field(default_factory=dict)
    body: Any = None
    body_encoding: Optional[Literal["json", "text", "base64"]] = None
    group: str = Field(DEFAULT_GROUP, min_length=1)
    version: str = Field(pattern=r"^\d{20}$")
    hash: str = Field(pattern=r"^[a-z0-9_]+:[0-9a-f]+$")
    size: Optional[int] = Field(None, ge=0)
    etag: Optional[str] = None
    last_modified: Optional[dt.datetime] = None
    cached_at: Optional[dt.datetime] = None

    @pydantic.field_validator("hash")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        try:
            _parse_expected_hash(value)
        except InvalidRequestError as exc:
            raise ValueError(str(exc)) from None
        return value


class SyncReport(_Model):
    """What ``Cache.sync`` found for each lockfile entry, as lists of URLs."""

    present: list[str] = Field(default_factory=list)
    downloaded: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    mismatched: list[str] = Field(default_factory=list)


#: Version row columns copied as they are by an import (the rest is this file's own).
_IMPORTED_VERSION_COLUMNS = ("version", "content_hash_hex", "pinned", "pinned_until_unix", "tags",
                             "request_unix", "cached_unix", "validated_unix", "content_attributes",
                             "download_stats")


class _ContentMismatch(Exception):
    """Content read from another cache file does not have the hash it is stored under."""


def _check_portability_options(seeds, lockfile) -> tuple[tuple[pathlib.Path, ...], pathlib.Path | None]:
    """Validate ``Cache(seeds=..., lockfile=...)``; lockfile None -> ``$BUFFYLITE_LOCKFILE``."""
    if isinstance(seeds, (str, bytes, os.PathLike)):
        raise InvalidRequestError("seeds must be a sequence of cache file paths, not a single path.")
    try:
        seeds = tuple(pathlib.Path(seed).expanduser() for seed in seeds)
        if lockfile is None:
            lockfile = os.environ.get("BUFFYLITE_LOCKFILE") or None
        lockfile = pathlib.Path(lockfile).expanduser() if lockfile is not None else None
    except TypeError as exc:
        raise InvalidRequestError(f"seeds and lockfile must be paths: {exc}.") from exc
    return seeds, lockfile


class _Seeds:
    """The read-only seed caches of a Cache (opened with it, closed with it)."""

    def __init__(self, paths: tuple[pathlib.Path, ...]):
        self._stores: list[_Store] = []
        try:
            for path in paths:
                self._stores.append(_open_store(path, read_only=True))
        except BaseException:
            self.close()
            raise

    def __bool__(self) -> bool:
        return bool(self._stores)

    def stores(self) -> list[_Store]:
        return self._stores

    def close(self) -> None:
        for store in self._stores:
            store.close()


def _lock_key(method: str, url: str, params, headers: dict, body_kind: str | None,
              body: bytes | None, group: str) -> str:
    """The identity of a request without sensitive header values (``None`` in ``headers``)."""
    header_items = sorted((str(name).lower(), value) for name, value in headers.items())
    params = json.loads(_canonical_json(params)) if params else None
    identity = [method, url, params, header_items, body_kind,
                hashlib.sha256(body).hexdigest() if body is not None else None, group]
    return hashlib.sha256(_canonical_json(identity).encode()).hexdigest()


def _identity_lock_key(identity: _Identity, sensitive: frozenset,
                       sensitive_params: frozenset = frozenset()) -> str:
    """The lock key of a fetch: the values of ``sensitive`` headers and ``sensitive_params``
    (lower-case names) left out, whether or not the identity itself digested them."""
    headers = {name: (None if name.lower() in sensitive else value)
               for name, value in identity.send_headers.items()}
    params = _params_by_name(identity.stored_params)
    if params and sensitive_params:
        params = {name: (None if name.lower() in sensitive_params else value) for name, value in params.items()}
    url = _mask_url(identity.url, sensitive_params) if sensitive_params else identity.url
    return _lock_key(identity.method, url, params, headers, identity.body_kind, identity.body, identity.group)


def _lockfile_sensitive_names(entries: dict[str, LockEntry] | None) -> tuple[frozenset, frozenset]:
    """(header names, parameter names), lower-case, that lockfile entries hold without a
    value (``null``, or ``***`` in the URL's query): secret where the lockfile was written."""
    headers, params = set(), set()
    for entry in (entries or {}).values():
        headers |= {name.lower() for name, value in entry.headers.items()
                    if value is None and _TOKEN.fullmatch(name)}
        params |= {name.lower() for name, value in (entry.params or {}).items()
                   if value is None and name.isprintable() and len(name) <= 1000}
        with contextlib.suppress(ValueError):
            params |= {name.lower() for name, value in urllib.parse.parse_qsl(
                urllib.parse.urlsplit(entry.url).query, keep_blank_values=True)
                if value == MASK and name and name.isprintable() and len(name) <= 1000}
    return frozenset(headers), frozenset(params)


def _is_digest(value) -> bool:
    """A stored header or parameter value that is a salted digest of a sensitive value."""
    return isinstance(value, str) and value.startswith("hmac-sha256:")


def _params_by_name(params: dict | None) -> dict | None:
    """Stored query parameters with sensitive values (salted digests, alone or in a
    list) named only: a lockfile holds no secret and no file's salt-bound digest."""
    if not params:
        return params
    return {name: (None if _is_digest(value) or (isinstance(value, list) and any(map(_is_digest, value)))
                   else value) for name, value in params.items()}


def _has_digests(request_row) -> bool:
    """Whether a stored request holds salted digests (sensitive headers or parameters),
    which only a file with the same salt can match."""
    params = json.loads(request_row.http_query_params or "null") or {}
    return (any(_is_digest(value) for value in json.loads(request_row.http_header_fields or "{}").values())
            or _params_by_name(params) != params)


def _stored_lock_key(request_row) -> str:
    headers = {name: (None if _is_digest(value) else value)
               for name, value in json.loads(request_row.http_header_fields or "{}").items()}
    params = _params_by_name(json.loads(request_row.http_query_params)
                             if request_row.http_query_params else None)
    body = bytes(request_row.http_request_body) if request_row.http_request_body is not None else None
    return _lock_key(request_row.http_method, request_row.url, params, headers, request_row.body_kind,
                     body, request_row.group_name)


def _stored_lock_key_or_none(request_row, path) -> str | None:
    """``_stored_lock_key``, or None (logged) when the request's stored values are damaged:
    such a request matches no lockfile entry, and the others still do."""
    try:
        return _stored_lock_key(request_row)
    except _DAMAGE_ERRORS as exc:
        log.warning("The stored request %s in the cache %s is damaged and matches no lockfile entry (%s).",
                    request_row.url, path, type(exc).__name__)
        return None


def _lock_entry_body(entry: LockEntry) -> tuple[str | None, bytes | None]:
    """The entry's body as (kind, bytes sent), the form the store keeps."""
    if entry.body_encoding is None or entry.body is None:
        return None, None
    try:
        if entry.body_encoding == "json":
            return "json", _canonical_json(entry.body).encode("utf-8")
        if entry.body_encoding == "text":
            return "text", str(entry.body).encode("utf-8")
        return "bytes", base64.b64decode(str(entry.body), validate=True)
    except ValueError as exc:
        raise InvalidRequestError(f"The lockfile body of {entry.url} is not valid "
                                  f"{entry.body_encoding}: {exc}.") from exc


def _entry_lock_key(entry: LockEntry) -> str:
    kind, body = _lock_entry_body(entry)
    return _lock_key(entry.method, _check_url(entry.url), entry.params, entry.headers, kind, body,
                     entry.group)


def _lock_entry(request_row, version_row, size: int | None, hash_type: str | None = None) -> LockEntry:
    """The lockfile entry for a stored request and its chosen version. ``hash_type``: the
    algorithm the version's content is hashed with (the request's may have changed since)."""
    body, encoding = None, None
    raw = request_row.http_request_body
    if raw is not None and request_row.body_kind is not None:
        encoding = {"json": "json", "text": "text"}.get(request_row.body_kind, "base64")
        body = (_decode_body(request_row.body_kind, bytes(raw)) if encoding != "base64"
                else base64.b64encode(bytes(raw)).decode("ascii"))
    attributes = json.loads(version_row.content_attributes or "{}")
    return LockEntry(
        url=request_row.url, method=request_row.http_method,
        params=_params_by_name(json.loads(request_row.http_query_params)
                               if request_row.http_query_params else None),
        headers={name: (None if _is_digest(value) else value)
                 for name, value in json.loads(request_row.http_header_fields or "{}").items()},
        body=body, body_encoding=encoding, group=request_row.group_name, version=version_row.version,
        hash=f"{hash_type or request_row.validation_hash_type}:{version_row.content_hash_hex}", size=size,
        etag=attributes.get("etag"), last_modified=attributes.get("last_modified_datetime_utc"),
        cached_at=_to_datetime(version_row.cached_unix))


def _lock_entry_order(entry: LockEntry) -> tuple:
    """Entries sorted by group, URL, method, then everything else: a stable order for diffs."""
    return entry.group, entry.url, entry.method, _canonical_json(entry.model_dump(mode="json"))


def _lockfile_text(entries: list[LockEntry]) -> str:
    """The lockfile document: sorted keys, one field per line, no time of writing."""
    document = {"buffylite_lockfile": LOCKFILE_FORMAT_VERSION,
                "entries": [entry.model_dump(mode="json") for entry in entries]}
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _read_lockfile(path: str | os.PathLike) -> dict[str, LockEntry]:
    """Lock key -> entry of the lockfile at ``path``; InvalidRequestError when unusable."""
    _check_path("lockfile", path)
    try:
        document = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"The lockfile {path} cannot be read: {exc}.") from exc
    if (not isinstance(document, dict) or document.get("buffylite_lockfile") != LOCKFILE_FORMAT_VERSION
            or not isinstance(document.get("entries"), list)):
        raise InvalidRequestError(f"The file {path} is not a buffylite lockfile of format "
                                  f"{LOCKFILE_FORMAT_VERSION}.")
    entries = {}
    for index, raw in enumerate(document["entries"]):
        try:
            entry = LockEntry.model_validate(raw)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
                                 for error in exc.errors())
            raise InvalidRequestError(f"Entry {index} of the lockfile {path} is invalid: {problems}.") from exc
        entries[_entry_lock_key(entry)] = entry
    return entries


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to the caller's ``path`` as ``Response.save_to`` does (see
    ``_write_to_callers_path``); CacheFileError naming the path when the system refuses."""
    try:
        _write_to_callers_path(path, lambda output: output.write(data))
    except OSError as exc:
        raise CacheFileError(f"Cannot write {path}: {exc}.", path=path) from exc


def _keep_only(store: _Store, group: str | None, locked: dict[str, LockEntry] | None) -> None:
    """In a private copy: remove every request outside ``group`` / the lockfile (and, for
    locked requests, every version but the locked one), then the content left unused."""
    requests = store.request_rows()
    keep: dict[int, str | None] = {}  # request id -> locked digest (None: every version)
    for row in requests:
        if group is not None and row.group_name != group:
            continue
        if locked is None:
            keep[row.id] = None
        elif (entry := locked.get(_stored_lock_key_or_none(row, store.path))) is not None:
            keep[row.id] = _parse_expected_hash(entry.hash)[1]
    store.keep_requests(requests, keep)


def _release_cache_resources(store: _Store, http: _HttpClient, seeds: "_Seeds") -> None:
    """Close a Cache's HTTP pool, connections and seed caches (``close()`` or its finaliser)."""
    for resource in (http, store, seeds):
        with contextlib.suppress(Exception):
            resource.close()


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------
#
# AsyncCache runs each blocking call of a Cache in a worker thread of its own pool,
# so a coroutine awaits while SQLite and the network work elsewhere. It is the same
# Cache underneath: single flight, leases and version choice hold between async and
# sync callers of one file.

#: Worker threads of one AsyncCache (each holds its own SQLite connection once used).
ASYNC_MAX_WORKERS = 16


def _asyncio():
    """The asyncio module, imported on first use: it costs ~20 ms at import, which
    callers that never touch AsyncCache should not pay."""
    import asyncio
    return asyncio


async def _run_blocking(executor, function: Callable, *args, **kwargs):
    """Run ``function`` in ``executor``; in asyncio's default pool when it is None or was
    shut down (its AsyncCache was closed: the Cache still works, as a closed Cache does)."""
    loop = _asyncio().get_running_loop()
    call = functools.partial(function, *args, **kwargs)
    try:
        future = loop.run_in_executor(executor, call)
    except RuntimeError:  # "cannot schedule new futures after shutdown"
        future = loop.run_in_executor(None, call)
    return await future


class _AsyncContentStream:
    """The asyncio side of ``Response.open()``: ``await stream.read(n)``.

    A content stream reads one SQLite snapshot on one connection, which belongs to the
    thread that opened it, so every call of one stream runs on one thread of its own.
    """

    def __init__(self, response: Response):
        import concurrent.futures  # noqa: PLC0415 - AsyncCache only; see the imports note
        self._response = response
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                             thread_name_prefix="buffylite-stream")
        self._stream: _ContentStream | None = None

    async def _call(self, function: Callable, *args):
        return await _asyncio().get_running_loop().run_in_executor(self._thread, function, *args)

    async def __aenter__(self) -> "_AsyncContentStream":
        self._stream = await self._call(self._response.open)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when ``size`` is -1); ``b""`` at the end."""
        if self._stream is None:
            raise InvalidRequestError("Use the stream as 'async with response.aopen() as stream'.")
        return await self._call(self._stream.read, size)

    async def close(self) -> None:
        """Release the snapshot and the stream's thread."""
        if self._stream is not None:
            await self._call(self._stream.close)
        self._thread.shutdown(wait=False)


class AsyncCache:
    """A Cache for asyncio: the same constructor arguments, the same methods as coroutines.

    ::

        async with buffylite.AsyncCache("cache.sqlite3") as acache:
            resp = await acache.fetch("https://example.org/data.csv")
            data = await resp.aread()
            async with resp.aopen() as stream:
                head = await stream.read(1024)

    Each call runs the blocking work (SQLite, the download) in a worker thread of this
    object's pool (at most ``ASYNC_MAX_WORKERS``), so the event loop is never blocked
    by it, whatever the download's size. The Responses are ordinary ones (``read()``
    works too) that also offer ``await resp.aread()`` and ``resp.aopen()``. Underneath
    is one ``Cache`` (``acache.cache``): a download started by an async caller and one
    started by a sync caller of the same file are the same single download.

    Cancelling an awaiting coroutine does not stop the worker thread: a download that
    has started runs to its end and is stored. ``callback`` arguments (``validator``,
    ``progress``) run in the worker thread. Opening the file happens in the
    constructor, which is quick (a new file is a few small writes).
    """

    def __init__(self, *args, **kwargs):
        import concurrent.futures  # noqa: PLC0415 - AsyncCache only; see the imports note
        self.cache = Cache(*args, **kwargs)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=ASYNC_MAX_WORKERS,
                                                               thread_name_prefix="buffylite-async")
        # Responses find the pool through their Cache (for aread()).
        self.cache._async_executor = self._executor

    @property
    def path(self) -> pathlib.Path:
        """The cache file."""
        return self.cache.path

    @property
    def read_only(self) -> bool:
        """True when the cache file was opened read-only (as ``Cache.read_only``)."""
        return self.cache.read_only

    def __repr__(self) -> str:
        return f"AsyncCache({str(self.cache.path)!r})"

    async def __aenter__(self) -> "AsyncCache":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _run(self, function: Callable, *args, **kwargs):
        return await _run_blocking(self._executor, function, *args, **kwargs)

    async def close(self) -> None:
        """Wait for running calls to end, then close the Cache (connections, HTTP pool)."""
        def shut_down() -> None:
            self._executor.shutdown(wait=True)
            self.cache.close()
        # Not on the pool being shut down: a thread of asyncio's default pool.
        await _asyncio().get_running_loop().run_in_executor(None, shut_down)

    @contextlib.asynccontextmanager
    async def lease(self, response: Response, seconds: float):
        """``Cache.lease`` as an ``async with`` block: the version is leased inside it."""
        manager = self.cache.lease(response, seconds)
        leased = await self._run(manager.__enter__)
        try:
            yield leased
        except BaseException:
            if not await self._run(manager.__exit__, *sys.exc_info()):
                raise
        else:
            await self._run(manager.__exit__, None, None, None)


def _async_method(name: str):
    """A coroutine method of AsyncCache running ``Cache.<name>`` in the worker pool."""
    blocking = getattr(Cache, name)

    async def method(self, *args, **kwargs):
        return await self._run(getattr(self.cache, name), *args, **kwargs)

    method.__name__, method.__qualname__ = name, f"AsyncCache.{name}"
    summary = (blocking.__doc__ or "").strip().split("\n\n")[0]
    method.__doc__ = f"``await``-able ``Cache.{name}`` (run in a worker thread).\n\n{summary}"
    method.__signature__ = inspect.signature(blocking)
    return method


#: Cache methods AsyncCache offers as coroutines (those this Cache has).
_ASYNC_METHOD_NAMES = ("fetch", "get", "get_request", "requests", "versions", "stats", "pin", "unpin",
                       "tag", "untag", "gc", "verify", "refresh", "delete", "lock", "sync", "backup",
                       "import_from")
for _name in _ASYNC_METHOD_NAMES:
    if hasattr(Cache, _name):
        setattr(AsyncCache, _name, _async_method(_name))
del _name


# ---------------------------------------------------------------------------
# Module-level fetch()
# ---------------------------------------------------------------------------

_default_cache: Cache | None = None
_default_cache_lock = threading.Lock()


def fetch(url: str, **kwargs) -> Response:
    """``Cache().fetch(url, **kwargs)`` on a default Cache opened once per process
    (at ``$BUFFYLITE_CACHE`` or the platform's user cache directory). See ``Cache.fetch``."""
    global _default_cache
    with _default_cache_lock:
        if _default_cache is None:
            _default_cache = Cache()
        cache = _default_cache
    return cache.fetch(url, **kwargs)


# ---------------------------------------------------------------------------
# Command line: python -m buffylite
# ---------------------------------------------------------------------------
#
# A thin layer over the public API. Global options are accepted before or after
# the subcommand; errors are one line on stderr (a traceback only with -v) and an
# exit status from the table below, so a script can tell the classes apart.

#: Exit statuses of the command line.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_CACHED, EXIT_INTEGRITY, EXIT_DOWNLOAD_FAILED = 0, 1, 2, 3, 4, 5


class _UsageError(Exception):
    """A command-line value the parser could not check (exit status 2)."""


#: Error type -> exit status; the first matching row wins (subclasses before bases).
_EXIT_STATUS_BY_ERROR: tuple[tuple[type, int], ...] = (
    (_UsageError, EXIT_USAGE),
    (InvalidRequestError, EXIT_USAGE),
    (NotCachedError, EXIT_NOT_CACHED),
    (IntegrityError, EXIT_INTEGRITY),
    (FetchError, EXIT_DOWNLOAD_FAILED),
)


def _exit_status_for(exc: BaseException) -> int:
    """The exit status for an error that ended a command (EXIT_ERROR when unlisted)."""
    for kind, status in _EXIT_STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status
    return EXIT_ERROR


def _error_object(exc: BaseException, message: str) -> dict:
    """The ``--json`` form of an error: ``{"error": {type, message, url, status_code}}``."""
    return {"error": {"type": type(exc).__name__ if isinstance(exc, BuffyliteError) else
                      "InvalidRequestError" if isinstance(exc, _UsageError) else "BuffyliteError",
                      "message": message, "url": getattr(exc, "url", None),
                      "status_code": getattr(exc, "status_code", None)}}


def _parse_strategy(text: str):
    """``never | age:SECONDS | when_requested | when_remote_changed[:CHECK[:FALLBACK]] | cron:EXPR
    | http[:FALLBACK]``."""
    name, _, rest = text.partition(":")
    try:
        if name == "never" and not rest:
            return ReCachingStrategy.never()
        if name == "age" and rest:
            return ReCachingStrategy.age(seconds=float(rest))
        if name == "when_requested" and not rest:
            return ReCachingStrategy.when_requested()
        if name == "when_remote_changed":
            numbers = [float(part) for part in rest.split(":")] if rest else []
            if len(numbers) <= 2:
                return ReCachingStrategy.when_remote_changed(*numbers)
        if name == "cron" and rest:
            return ReCachingStrategy.cron(cron=rest)
        if name == "http":
            return ReCachingStrategy.http(*([float(rest)] if rest else []))
    except (ValueError, pydantic.ValidationError) as exc:
        raise _UsageError(f"--strategy {text!r}: {exc}") from exc
    raise _UsageError(f"--strategy {text!r} is not never, age:SECONDS, when_requested, "
                      "when_remote_changed[:CHECK[:FALLBACK]], cron:EXPR or http[:FALLBACK].")


def _parse_pairs(values: list[str] | None, separator: str, option: str) -> dict | None:
    """``["K: V", ...]`` (headers) or ``["k=v", ...]`` (params) -> dict."""
    if not values:
        return None
    pairs = {}
    for value in values:
        key, found, item = value.partition(separator)
        if not found or not key.strip():
            raise _UsageError(f"{option} {value!r} is not in the form 'K{separator}V'.")
        pairs[key.strip()] = item.strip()
    return pairs


def _identity_arguments(args) -> dict:
    return {"method": args.method, "group": args.group,
            "headers": _parse_pairs(args.header, ":", "--header"),
            "params": _parse_pairs(args.param, "=", "--param")}


def _lease_text(response: Response) -> str:
    if response.pinned:
        return "pinned"
    if response.is_pinned:
        return "until " + response.pinned_until_utc.strftime("%Y-%m-%d %H:%M:%S")
    return ""


def _version_row(response: Response) -> dict:
    return {"version": response.version, "status": response.status,
            "size": response.content_attributes.content_size_bytes,
            "hash": (response.content_hash_hex or "")[:12], "pin": _lease_text(response),
            "tags": ",".join(response.tags),
            "cached_at": (response.cached_datetime_utc.strftime("%Y-%m-%d %H:%M:%S")
                          if response.cached_datetime_utc else "")}


def _one_line(text: str | None) -> str:
    """A message on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(text or "").split())


def _strategy_text(strategy) -> str:
    """A strategy with its settings, e.g. ``age(seconds=3600)``."""
    settings = []
    for name, value in strategy.model_dump().items():
        if name == "strategy_name":
            continue
        settings.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value!r}")
    return f"{strategy.strategy_name}({', '.join(settings)})"


def _parse_as_of(text: str | None) -> dt.datetime | None:
    """``--as-of``: ISO 8601 with ``Z`` or an offset (a naive time is ambiguous: usage error)."""
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" and text else text)
    except ValueError:
        raise _UsageError(f"--as-of {text!r} is not an ISO 8601 date and time "
                          "(e.g. 2026-01-31T12:00:00Z).") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _UsageError(f"--as-of {text!r} has no time zone: add Z (UTC) or an offset such as +01:00.")
    return moment


#: Bytes of content looked at to tell text from binary before writing to a terminal.
_BINARY_SNIFF_BYTES = 8192


def _looks_binary(head: bytes) -> bool:
    """True when ``head`` has a NUL byte or is not UTF-8 (a character cut at the end is fine)."""
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head) - 3  # only a multi-byte character cut by the sniff is allowed
    return False


def _progress_label(args) -> str:
    """The file name the progress bar shows: the ``-o`` target's, else the URL's last segment."""
    if args.output and args.output != "-":
        return pathlib.Path(args.output).name
    return _guess_filename(None, args.url, None) or urllib.parse.urlsplit(args.url).hostname or args.url


def _print_table(rows: list[dict], out) -> None:
    """Short aligned columns; the keys of the first row are the header."""
    if not rows:
        out.write("(none)\n")
        return
    columns = list(rows[0])
    cells = [[str("" if row[column] is None else row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    for line in [[column.upper() for column in columns]] + cells:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n")


def _emit(args, data, human: Callable[[], None]) -> None:
    """JSON with --json, else the human form."""
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        human()


class _ProgressBar:
    """A progress bar on stderr (tqdm when installed, else a plain one-line bar)."""

    def __init__(self, label: str):
        self._label = label
        self._bar = None
        self._tqdm = _optional_extra("tqdm")
        self._started = time.monotonic()
        self._last_drawn = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if self._tqdm is not None:
            if self._bar is None:
                self._bar = self._tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                       desc=self._label, file=sys.stderr, leave=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_drawn < 0.1 and done != total:
            return
        self._last_drawn = now
        speed = done / max(now - self._started, 1e-6)
        if total:
            filled = int(30 * done / total)
            eta = (total - done) / speed if speed else 0
            text = (f"\r{self._label} [{'#' * filled}{'.' * (30 - filled)}] {done / 2**20:7.1f}/"
                    f"{total / 2**20:.1f} MiB {speed / 2**20:6.1f} MiB/s ETA {eta:4.0f}s")
        else:
            text = f"\r{self._label} {done / 2**20:7.1f} MiB {speed / 2**20:6.1f} MiB/s"
        sys.stderr.write(text)
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._last_drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _cmd_fetch(cache: Cache, args) -> int:
    identity = _identity_arguments(args)
    configuration = None
    if args.strategy or args.keep is not None or args.keep_pinned is not None:
        stored = cache.get_request(args.url, **identity)
        base = stored.cache_configuration if stored else RequestCacheConfiguration()
        changes = {"recaching_strategy": _parse_strategy(args.strategy) if args.strategy else None,
                   "max_cached_unpinned_versions": args.keep, "max_cached_pinned_versions": args.keep_pinned}
        configuration = RequestCacheConfiguration.model_validate(
            {**base.model_dump(), **{key: value for key, value in changes.items() if value is not None}})
    if args.output == "-" and args.json:
        raise _UsageError("-o - and --json would both write to stdout; use one of them.")
    as_of = _parse_as_of(args.as_of)
    progress = _ProgressBar(_progress_label(args)) if sys.stderr.isatty() and not args.quiet else None
    try:
        response = cache.fetch(args.url, cache_configuration=configuration, offline=args.offline or None,
                               expected_hash=args.expected_hash, force_version=args.force_version,
                               force_tag=args.force_tag, force_pinned=args.force_pinned or None,
                               prefer_version=args.prefer_version, prefer_tag=args.prefer_tag,
                               prefer_pinned=args.prefer_pinned or None, as_of=as_of,
                               pin_for=args.pin_for, progress=progress,
                               refresh=args.refresh, stale_if_error=not args.no_stale, **identity)
    finally:
        if progress is not None:
            progress.close()
    returned = {"outcome": response.outcome, "stale_reason": response.stale_reason}
    expected = response.__pydantic_private__.get("_expected_hash")
    if args.pin:
        response = cache.pin(response).model_copy(update=returned)
    for tag in args.tag or ():
        response = cache.tag(response, tag).model_copy(update=returned)
    # pin/tag answer with a fresh Response: it must still check --expected-hash on output.
    response.__pydantic_private__["_expected_hash"] = expected
    saved = unpacked = None
    if args.unpack:
        unpacked = response.unpack(args.unpack)
        if not args.json:
            sys.stdout.write(f"{unpacked}\n")
    elif args.output == "-" or not (args.output or args.dir or args.json):
        _write_content_to_stdout(response, asked=args.output == "-")
    elif args.output or args.dir:
        # -o FILE writes through a symlink and into a FIFO or device (the user named it);
        # -d DIR takes the origin's sanitised file name and replaces whatever is there.
        saved = response.save_to(args.output) if args.output else response.save_to(dir=args.dir)
    if args.json:
        data = response.model_dump(mode="json")
        data["saved_to"] = str(saved) if saved else None
        data["unpacked_to"] = str(unpacked) if unpacked else None
        _emit(args, data, lambda: None)
    where = f" -> {saved}" if saved else ""
    if response.outcome == "stale" and not args.quiet:
        # The one line that says so (the library's own warning is held back by main()).
        sys.stderr.write(f"buffylite: served stale version {response.version} of {response.url}{where} "
                         f"because {response.stale_reason or 'the download failed'}\n")
    elif not args.json and not args.quiet:
        sys.stderr.write(f"{response.url}: version {response.version} ({response.outcome}){where}\n")
    return 0


def _write_content_to_stdout(response: Response, *, asked: bool) -> None:
    """Stream the content to stdout; to a terminal only when it looks like text or ``asked``
    (``-o -``), else one stderr line says how to get it."""
    with response.open() as stream:
        head = stream.read(_BINARY_SNIFF_BYTES)
        if not asked and sys.stdout.isatty() and _looks_binary(head):
            size = response.content_attributes.content_size_bytes
            sys.stderr.write(f"buffylite: version {response.version} of {response.url} is binary "
                             f"({size} bytes), not written to the terminal; use -o FILE, -d DIR, "
                             "or -o - to write it here anyway.\n")
            return
        sys.stdout.buffer.write(head)
        for piece in iter(lambda: stream.read(DEFAULT_CHUNK_SIZE_BYTES), b""):
            sys.stdout.buffer.write(piece)
    sys.stdout.buffer.flush()


def _cmd_path(cache: Cache, args) -> int:
    response = cache.get(args.url, args.version or "latest", **_identity_arguments(args))
    path = response.as_file()
    _emit(args, {"url": response.url, "version": response.version, "path": str(path)},
          lambda: sys.stdout.write(f"{path}\n"))
    return 0


def _cmd_versions(cache: Cache, args) -> int:
    status = None if args.status == "all" else args.status
    versions = cache.versions(args.url, status=status, **_identity_arguments(args))
    with_error = status in (None, "failed")  # an ERROR column where failed rows can appear
    rows = [{**_version_row(response), **({"error": _one_line(response.download_stats.error)}
                                          if with_error else {})} for response in versions]
    _emit(args, [response.model_dump(mode="json") for response in versions],
          lambda: _print_table(rows, sys.stdout))
    return 0


def _cmd_requests(cache: Cache, args) -> int:
    requests = cache.requests(args.group)
    rows = [{"id": request.id, "group": request.group_name, "method": request.http_method,
             "strategy": _strategy_text(request.cache_configuration.recaching_strategy),
             "keep": request.cache_configuration.max_cached_unpinned_versions,
             "keep_pinned": request.cache_configuration.max_cached_pinned_versions, "url": request.url}
            for request in requests]
    _emit(args, [request.model_dump(mode="json") for request in requests],
          lambda: _print_table(rows, sys.stdout))
    return 0


def _cmd_show(cache: Cache, args) -> int:
    identity = _identity_arguments(args)
    if args.version is None or args.version == "latest":
        # The newest ready version; when none is ready, the newest in any state (so a
        # request whose downloads all failed shows why).
        response = next(iter(cache.versions(args.url, **identity) or cache.versions(
            args.url, status=None, **identity)), None)
    else:
        if len(args.version) != 20 or not args.version.isdigit():
            raise _UsageError(f"VERSION {args.version!r} is not 'latest' or a version (20 digits).")
        response = next((candidate for candidate in cache.versions(args.url, status=None, **identity)
                         if candidate.version == args.version), None)
    if response is None:
        which = "any version" if args.version in (None, "latest") else f"version {args.version}"
        raise NotCachedError(f"No {which} of {args.url} in {cache.path}.")
    data = response.model_dump(mode="json", exclude={"outcome", "stale_reason"})

    def human() -> None:
        if response.download_stats.error:
            sys.stdout.write(f"error: {_one_line(response.download_stats.error)}\n")
        for key, value in data.items():
            if isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    sys.stdout.write(f"{key}.{sub_key}: {sub_value}\n")
            else:
                sys.stdout.write(f"{key}: {value}\n")
    _emit(args, data, human)
    return 0


def _cmd_pin(cache: Cache, args) -> int:
    response = cache.pin(cache.get(args.url, args.version, **_identity_arguments(args)), seconds=args.seconds)
    _emit(args, response.model_dump(mode="json"),
          lambda: sys.stdout.write(f"{response.version}: {_lease_text(response)}\n"))
    return 0


def _cmd_unpin(cache: Cache, args) -> int:
    response = cache.unpin(cache.get(args.url, args.version, **_identity_arguments(args)))
    _emit(args, response.model_dump(mode="json"),
          lambda: sys.stdout.write(f"{response.version}: unpinned\n"))
    return 0


def _cmd_tag(cache: Cache, args) -> int:
    operation = cache.tag if args.command == "tag" else cache.untag
    response = operation(cache.get(args.url, args.version, **_identity_arguments(args)), args.tag)
    _emit(args, response.model_dump(mode="json"),
          lambda: sys.stdout.write(f"{response.version}: tags {','.join(response.tags) or '(none)'}\n"))
    return 0


def _cmd_gc(cache: Cache, args) -> int:
    report = cache.gc()

    def human() -> None:
        removed = ", ".join(f"{count} {reason}" for reason, count in report.removed.items() if count)
        sys.stdout.write(f"removed: {removed or 'nothing'}\nbytes freed: {report.bytes_freed}\n"
                         f"file size: {report.file_size_before} -> {report.file_size_after} bytes\n")
    _emit(args, report.model_dump(mode="json"), human)
    return 0


def _cmd_verify(cache: Cache, args) -> int:
    report = cache.verify()

    def human() -> None:
        if report.intact:
            sys.stdout.write(f"{report.checked} contents checked, all intact\n")
            return
        if report.corrupted:
            _print_table([{"url": response.url, **_version_row(response)}
                          for response in report.corrupted], sys.stdout)
        for problem in report.problems:
            sys.stdout.write(f"problem: {problem}\n")
    _emit(args, report.model_dump(mode="json"), human)
    if report.corrupted:
        sys.stderr.write(f"buffylite: {len(report.corrupted)} versions have corrupted content "
                         "(marked failed).\n")
    if report.problems:
        sys.stderr.write(f"buffylite: {len(report.problems)} problems found in the cache file "
                         f"{cache.path}.\n")
    return EXIT_INTEGRITY if not report.intact else 0


def _cmd_refresh(cache: Cache, args) -> int:
    results = cache.refresh(args.group)
    _emit(args, [result.model_dump(mode="json") for result in results],
          lambda: _print_table([result.model_dump() for result in results], sys.stdout))
    return 1 if any(result.outcome == "error" for result in results) else 0


def _cmd_delete(cache: Cache, args) -> int:
    removed = cache.delete(args.url, **_identity_arguments(args))
    shown = _mask_url(args.url, cache._sensitive_params)  # never echo a password
    _emit(args, {"url": shown, "versions_removed": removed},
          lambda: sys.stdout.write(f"{shown}: {removed} versions removed\n"))
    return 0


def _cmd_info(cache: Cache, args) -> int:
    stats = cache.stats()

    def human() -> None:
        for key, value in stats.items():
            if isinstance(value, dict):
                value = ", ".join(f"{status} {count}" for status, count in value.items())
            sys.stdout.write(f"{key + ':':<18}{value}\n")
    _emit(args, stats, human)
    return 0


def _count_text(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cmd_lock(cache: Cache, args) -> int:
    entries = cache.lock(args.output, group=args.group, tag=args.tag, pinned=True if args.pinned else None)
    if args.output is None:
        sys.stdout.write(_lockfile_text(entries))
    elif not args.quiet:
        sys.stderr.write(f"{_count_text(len(entries), 'request')} locked in {args.output}\n")
    return 0


def _cmd_sync(cache: Cache, args) -> int:
    report = cache.sync(args.file, offline=args.offline)

    def human() -> None:
        for name, urls in report.model_dump().items():
            for url in urls:
                sys.stdout.write(f"{name:<11}{url}\n")
    _emit(args, report.model_dump(mode="json"), human)
    if report.mismatched:
        sys.stderr.write(f"buffylite: {_count_text(len(report.mismatched), 'locked request')} now "
                         f"served with other content than {args.file} records.\n")
        return EXIT_INTEGRITY
    if report.missing:
        sys.stderr.write(f"buffylite: {_count_text(len(report.missing), 'locked request')} could not be "
                         "made present (offline, download failed, or header values not in the lockfile).\n")
        return EXIT_NOT_CACHED
    return 0


def _cmd_backup(cache: Cache, args) -> int:
    written = cache.backup(args.dest, group=args.group, lockfile=args.lock)
    _emit(args, {"backup": str(written)}, lambda: sys.stdout.write(f"{written}\n"))
    return 0


def _cmd_import(cache: Cache, args) -> int:
    added = cache.import_from(args.source, group=args.group)
    _emit(args, {"source": args.source, "versions_added": added},
          lambda: sys.stdout.write(f"{args.source}: {added} versions added\n"))
    return 0


def _build_parser(*, json_errors: bool = False):
    """The command-line parser. ``json_errors``: usage errors found while parsing are
    also printed on stdout as the ``--json`` error object (the command line holds ``--json``).

    A command's own parser (its options and their help) is made only when the command is
    chosen, by ``_Commands``: a process runs one command, and making all of them costs
    more than a cached fetch itself. What is printed (help, usage, errors) is the same."""
    import argparse  # noqa: PLC0415 - the CLI only; see the imports note

    class _ArgumentParser(argparse.ArgumentParser):
        """argparse's parser (subcommand parsers are of the same class) with JSON usage errors."""

        def error(self, message: str):
            if json_errors:
                with contextlib.suppress(OSError):
                    sys.stdout.write(json.dumps(_error_object(_UsageError(message), message)) + "\n")
                    sys.stdout.flush()
            super().error(message)

    class _Commands(argparse._SubParsersAction):
        """The subcommands; each one's parser is made by its ``make`` function when the
        command is chosen. Until then the name is a valid choice (with a placeholder) and
        its one-line help is listed in the top-level ``--help``, as ``add_parser`` would."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._makers: dict[str, Callable] = {}

        def add_command(self, name: str, text: str, make: Callable) -> None:
            """``name`` with its help line; ``make(self)`` adds its parser (without ``help=``:
            the line is listed already) when the command is chosen."""
            self._makers[name] = make
            self._name_parser_map[name] = None
            self._choices_actions.append(self._ChoicesPseudoAction(name, (), text))

        def __call__(self, parser, namespace, values, option_string=None):
            make = self._makers.pop(values[0], None)
            if make is not None:
                del self._name_parser_map[values[0]]
                make(self)
            super().__call__(parser, namespace, values, option_string)

    # Global options live in a parent parser shared by the main parser and every
    # subcommand; SUPPRESS keeps a subcommand from resetting what came before it.
    def global_options(suppress: bool) -> argparse.ArgumentParser:
        default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
        parent = argparse.ArgumentParser(add_help=False)
        parent.add_argument("--cache", metavar="PATH", default=default(None),
                            help="cache file (default: $BUFFYLITE_CACHE or the user cache directory)")
        parent.add_argument("--json", action="store_true", default=default(False),
                            help="machine-readable output")
        parent.add_argument("-v", "--verbose", action="store_true", default=default(False),
                            help="log progress; show tracebacks")
        parent.add_argument("-q", "--quiet", action="store_true", default=default(False),
                            help="only errors on stderr")
        parent.add_argument("--retries", type=int, metavar="N", default=default(DEFAULT_RETRIES),
                            help=f"retries of a failed download (default {DEFAULT_RETRIES})")
        parent.add_argument("--timeout", type=float, metavar="SECONDS", default=default(DEFAULT_TIMEOUT_SEC),
                            help=f"connect and read timeout (default {DEFAULT_TIMEOUT_SEC:g})")
        return parent

    def identity_options() -> argparse.ArgumentParser:
        identity = argparse.ArgumentParser(add_help=False)
        identity.add_argument("--method", default="get", help="get, post or put (default get)")
        identity.add_argument("--header", action="append", metavar="'K: V'", help="request header (repeatable)")
        identity.add_argument("--param", action="append", metavar="k=v", help="query parameter (repeatable)")
        identity.add_argument("--group", default=DEFAULT_GROUP, help=f"request group (default {DEFAULT_GROUP})")
        return identity

    parser = _ArgumentParser(
        prog="buffylite", parents=[global_options(False)],
        description="A versioning HTTP download cache in one SQLite file.")
    parser.add_argument("--version", action="version", version=f"buffylite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=_Commands)

    def common() -> list[argparse.ArgumentParser]:
        return [global_options(True)]

    def fetch(commands: _Commands) -> None:
        fetch_parser = commands.add_parser("fetch", parents=common() + [identity_options()])
        fetch_parser.add_argument("url")
        output = fetch_parser.add_mutually_exclusive_group()
        output.add_argument("-o", "--output", metavar="FILE", help="write the content to FILE ('-': stdout, "
                                                                    "even binary content to a terminal)")
        output.add_argument("-d", "--dir", metavar="DIR", help="write the content into DIR under its file name")
        output.add_argument("--unpack", metavar="DIR",
                            help="unpack the zip/tar/gz/bz2/xz content into DIR and print DIR")
        fetch_parser.add_argument("--strategy", help="never | age:SECONDS | when_requested | "
                                                     "when_remote_changed[:CHECK[:FALLBACK]] | cron:EXPR | "
                                                     "http[:FALLBACK]")
        fetch_parser.add_argument("--keep", type=int, metavar="N", help="unpinned versions to keep")
        fetch_parser.add_argument("--keep-pinned", type=int, metavar="N", help="pinned versions to keep")
        fetch_parser.add_argument("--pin", action="store_true", help="pin the returned version permanently")
        fetch_parser.add_argument("--pin-for", type=float, metavar="SECONDS", help="lease the returned version")
        fetch_parser.add_argument("--tag", action="append", metavar="T", help="tag the returned version")
        fetch_parser.add_argument("--offline", action="store_true", help="never touch the network")
        fetch_parser.add_argument("--refresh", action="store_true",
                                  help="download now (conditionally when possible), whatever the strategy")
        fetch_parser.add_argument("--no-stale", action="store_true",
                                  help="fail (exit 5) instead of serving a stale version when the download fails")
        fetch_parser.add_argument("--expected-hash", metavar="HASH", help="'sha256:<hex>' or '<hex>'")
        fetch_parser.add_argument("--force-version", metavar="V", help="return exactly this version")
        fetch_parser.add_argument("--force-tag", metavar="T", help="return the newest version with this tag")
        fetch_parser.add_argument("--force-pinned", action="store_true", help="return the newest pinned version")
        fetch_parser.add_argument("--prefer-version", metavar="V", help="prefer this version")
        fetch_parser.add_argument("--prefer-tag", metavar="T", help="prefer the newest version with this tag")
        fetch_parser.add_argument("--prefer-pinned", action="store_true",
                                  help="prefer the newest pinned version")
        fetch_parser.add_argument("--as-of", metavar="DATETIME",
                                  help="the version current at DATETIME (ISO 8601 with Z or an offset); "
                                       "no network")
        fetch_parser.set_defaults(handler=_cmd_fetch)

    def one_version(name: str, handler: Callable) -> Callable[[_Commands], None]:
        """A command about one version of a request: URL, then the version (default: the newest)."""
        def make(commands: _Commands) -> None:
            version_parser = commands.add_parser(name, parents=common() + [identity_options()])
            version_parser.add_argument("url")
            version_parser.add_argument("version", nargs="?")
            version_parser.set_defaults(handler=handler)
        return make

    def versions(commands: _Commands) -> None:
        versions_parser = commands.add_parser("versions", parents=common() + [identity_options()])
        versions_parser.add_argument("url")
        versions_parser.add_argument("--status", default="ready", choices=VERSION_STATUSES + ("all",))
        versions_parser.set_defaults(handler=_cmd_versions)

    def requests(commands: _Commands) -> None:
        requests_parser = commands.add_parser("requests", parents=common())
        requests_parser.add_argument("--group")
        requests_parser.set_defaults(handler=_cmd_requests)

    def pin(commands: _Commands) -> None:
        pin_parser = commands.add_parser("pin", parents=common() + [identity_options()])
        pin_parser.add_argument("url")
        pin_parser.add_argument("version")
        pin_parser.add_argument("--for", dest="seconds", type=float, metavar="SECONDS",
                                help="a lease of SECONDS instead of a permanent pin")
        pin_parser.set_defaults(handler=_cmd_pin)

    def unpin(commands: _Commands) -> None:
        unpin_parser = commands.add_parser("unpin", parents=common() + [identity_options()])
        unpin_parser.add_argument("url")
        unpin_parser.add_argument("version")
        unpin_parser.set_defaults(handler=_cmd_unpin)

    def tag(name: str) -> Callable[[_Commands], None]:
        def make(commands: _Commands) -> None:
            tag_parser = commands.add_parser(name, parents=common() + [identity_options()])
            tag_parser.add_argument("url")
            tag_parser.add_argument("version")
            tag_parser.add_argument("tag")
            tag_parser.set_defaults(handler=_cmd_tag)
        return make

    def plain(name: str, handler: Callable) -> Callable[[_Commands], None]:
        """A command with the global options only."""
        return lambda commands: commands.add_parser(name, parents=common()).set_defaults(handler=handler)

    def refresh(commands: _Commands) -> None:
        refresh_parser = commands.add_parser("refresh", parents=common())
        refresh_parser.add_argument("--group")
        refresh_parser.set_defaults(handler=_cmd_refresh)

    def delete(commands: _Commands) -> None:
        delete_parser = commands.add_parser("delete", parents=common() + [identity_options()])
        delete_parser.add_argument("url")
        delete_parser.set_defaults(handler=_cmd_delete)

    def lock(commands: _Commands) -> None:
        lock_parser = commands.add_parser("lock", parents=common())
        lock_parser.add_argument("-o", "--output", metavar="FILE", help="write the lockfile to FILE")
        lock_parser.add_argument("--group", help="only requests of this group")
        lock_parser.add_argument("--tag", metavar="T", help="lock the newest version carrying this tag")
        lock_parser.add_argument("--pinned", action="store_true", help="lock the newest pinned version")
        lock_parser.set_defaults(handler=_cmd_lock)

    def sync(commands: _Commands) -> None:
        sync_parser = commands.add_parser("sync", parents=common())
        sync_parser.add_argument("file", metavar="FILE")
        sync_parser.add_argument("--offline", action="store_true", help="never touch the network")
        sync_parser.set_defaults(handler=_cmd_sync)

    def backup(commands: _Commands) -> None:
        backup_parser = commands.add_parser("backup", parents=common())
        backup_parser.add_argument("dest", metavar="DEST")
        backup_parser.add_argument("--group", help="only requests of this group")
        backup_parser.add_argument("--lock", metavar="FILE",
                                   help="only the requests and versions of this lockfile")
        backup_parser.set_defaults(handler=_cmd_backup)

    def import_(commands: _Commands) -> None:
        import_parser = commands.add_parser("import", parents=common())
        import_parser.add_argument("source", metavar="SOURCE")
        import_parser.add_argument("--group", help="only requests of this group")
        import_parser.set_defaults(handler=_cmd_import)

    # In the order of the top-level --help.
    for name, text, make in (
            ("fetch", "fetch a URL through the cache (content to stdout)", fetch),
            ("path", "print the path of a read-only file holding the content", one_version("path", _cmd_path)),
            ("versions", "list versions", versions),
            ("requests", "list stored requests", requests),
            ("show", "show one version", one_version("show", _cmd_show)),
            ("pin", "pin a version", pin),
            ("unpin", "unpin a version", unpin),
            ("tag", "tag a version", tag("tag")),
            ("untag", "remove a tag from a version", tag("untag")),
            ("gc", "collect garbage, shrink the file", plain("gc", _cmd_gc)),
            ("verify", "re-hash all content", plain("verify", _cmd_verify)),
            ("refresh", "apply every request's strategy now", refresh),
            ("delete", "forget a request", delete),
            ("info", "cache file facts and counts", plain("info", _cmd_info)),
            ("lock", "write a lockfile of the versions in use (stdout by default)", lock),
            ("sync", "make every locked version present", sync),
            ("backup", "write a consistent, compact copy of the cache", backup),
            ("import", "merge another cache file into this one", import_)):
        commands.add_command(name, text, make)
    return parser


#: Commands that only read: they never create a cache file or its directory.
_READ_ONLY_COMMANDS = frozenset({"versions", "requests", "show", "path", "info", "verify", "lock", "backup"})
#: Commands that change what a cache holds and have nothing to act on in a new one.
_CHANGING_COMMANDS = frozenset({"pin", "unpin", "tag", "untag", "gc", "delete", "refresh"})


def _require_existing_cache(path: str | None, *, reads_only: bool = True) -> None:
    """Raise CacheFileError naming the cache file when it does not exist (URLs are
    judged by Cache itself, without ever showing their password). ``reads_only``: what
    the message says the command does."""
    location = path if path is not None else os.environ.get("BUFFYLITE_CACHE", "")
    _refuse_url_location(location)
    if _is_postgres_location(location):
        return
    resolved = pathlib.Path(path).expanduser() if path is not None else _default_cache_path()
    if not resolved.is_file():
        does = "only reads" if reads_only else "changes a cache that exists"
        raise CacheFileError(f"The cache file {resolved} does not exist; this command {does} "
                             "and does not create one (check --cache or $BUFFYLITE_CACHE).", path=resolved)


def _settle_imports() -> None:
    """Leave what the imports made to the end of the process (``_run_as_program``).

    The program runs one command and ends. The modules, classes and pydantic validators
    the imports made (tens of thousands of objects in reference cycles) live until then
    anyway, so they are moved out of the cyclic garbage collector's sight (``gc.freeze``):
    it no longer walks them during the command, nor tears them down cycle by cycle at exit,
    which took about a fifth of a cached fetch's time; the operating system takes the memory
    back. Everything the command makes is collected as usual, and the command closes the
    cache (its connections, the WAL) and flushes its output itself before it returns.
    """
    import gc  # noqa: PLC0415 - only the program needs it

    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Exit statuses: 0 success; 1 other errors; 2 usage (bad option or value); 3 not
    cached; 4 integrity; 5 download failed with nothing cached. With ``--json`` an
    error is also printed on stdout as ``{"error": {"type", "message", "url",
    "status_code"}}``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Usage errors found while parsing are JSON too when --json was asked for.
    parser = _build_parser(json_errors="--json" in argv)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("buffylite: %(message)s"))
    # ``fetch`` reports a stale answer itself, in one line with its cause.
    handler.addFilter(lambda record: not getattr(record, "buffylite_stale", False))
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING)
    try:
        if args.command in _READ_ONLY_COMMANDS | _CHANGING_COMMANDS:
            # A mistyped path must not leave a new empty cache behind.
            _require_existing_cache(args.cache, reads_only=args.command in _READ_ONLY_COMMANDS)
        if args.command == "sync":
            _read_lockfile(args.file)  # an unusable lockfile must not create the cache first
        if args.command == "import" and not _is_postgres_location(args.source):
            source = pathlib.Path(args.source).expanduser()
            if not source.is_file():  # nor a missing source
                raise CacheFileError(f"The cache file {source} to import from does not exist; nothing was "
                                     "imported.", path=source)
        with Cache(args.cache, retries=args.retries, timeout=args.timeout) as cache:
            return args.handler(cache, args)
    except _UsageError as exc:
        if args.json:
            sys.stdout.write(json.dumps(_error_object(exc, str(exc))) + "\n")
            sys.stdout.flush()
        parser.error(str(exc))  # exits with EXIT_USAGE after the usage line
    except BrokenPipeError:
        # The reader went away (``| head``): that is how pipelines end, not an error.
        # Say nothing; keep Python from complaining again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (BuffyliteError, pydantic.ValidationError, OSError) as exc:
        if args.verbose:
            import traceback
            traceback.print_exc()
        message = " ".join(str(exc).split()) if not isinstance(exc, pydantic.ValidationError) else \
            "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())
        status = EXIT_USAGE if isinstance(exc, pydantic.ValidationError) else _exit_status_for(exc)
        if args.json:
            error = _error_object(exc, message)
            if isinstance(exc, NotCachedError) and error["error"]["url"] is None:
                error["error"]["url"] = getattr(args, "url", None)  # the URL the command was about
            with contextlib.suppress(OSError):
                sys.stdout.write(json.dumps(error) + "\n")
                sys.stdout.flush()
        sys.stderr.write(f"buffylite: error: {message}\n")
        return status
    except KeyboardInterrupt:
        sys.stderr.write("buffylite: interrupted\n")
        return 130
    finally:
        log.removeHandler(handler)


def _run_as_program() -> int:
    """``python -m buffylite`` and the ``buffylite`` script: ``main()`` on the process's
    arguments, in a process that ends with the command (see ``_settle_imports``). A
    program that calls ``main()`` itself keeps its garbage collector as it is."""
    _settle_imports()
    return main()


if __name__ == "__main__":
    # Under ``python -m buffylite`` this file runs as ``__main__``; alias it so an
    # ``import buffylite`` elsewhere gets this same module, not a second copy.
    sys.modules.setdefault("buffylite", sys.modules[__name__])
    sys.exit(_run_as_program())
