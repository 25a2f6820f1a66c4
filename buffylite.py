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

Runtime dependencies: pydantic >= 2.5, urllib3 >= 2.0, peewee >= 3.17.
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
  doing. A row whose lease expired is abandoned: a later ``fetch`` of the same
  request resumes its partial content when the origin still validates it, and
  ``gc()`` reclaims it otherwise. Calls that waited for a download get its
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
  expected hash's algorithm).
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
- ``lease()`` blocks that overlap on one version follow §9 literally: the first to
  exit puts back the lease end it found, which may end a shorter lease another
  block asked for meanwhile (that one never extended anything).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------

import argparse
import base64
import bisect
import contextlib
import dataclasses
import datetime as dt
import email.message
import email.utils
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import mimetypes
import os
import pathlib
import random
import re
import secrets
import select
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import urllib.request
import weakref
from typing import Annotated, Any, Callable, Iterator, Literal, Optional, Union

import peewee
import pydantic
import urllib3
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints
from urllib3.util.retry import Retry

try:  # optional extra: buffylite[cron]
    import croniter as _croniter
except ImportError:  # pragma: no cover - depends on the environment
    _croniter = None

try:  # optional extra: buffylite[progress]
    import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None

__version__ = "0.1.0"

__all__ = sorted([
    "BuffyliteError",
    "Cache",
    "CacheFileError",
    "FetchError",
    "GCReport",
    "IntegrityError",
    "InvalidRequestError",
    "NotCachedError",
    "ReCachingStrategy",
    "RefreshResult",
    "Request",
    "RequestCacheConfiguration",
    "Response",
    "ResponseContentAttributes",
    "ResponseDownloadStats",
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
#: Version of the file layout; see ``_MIGRATIONS``.
SCHEMA_VERSION = 2
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

_SQLITE_MAGIC = b"SQLite format 3\x00"
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
    home = pathlib.Path.home()
    if sys.platform == "win32":
        base = pathlib.Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        base = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    return base / "buffylite" / "cache.sqlite3"


def _check_hash_type(name: str) -> str:
    """Return ``name`` lower-cased if hashlib knows it, else raise InvalidRequestError."""
    normalized = name.lower()
    if normalized not in hashlib.algorithms_available:
        raise InvalidRequestError(
            f"Unknown hash type {name!r}; use a hashlib algorithm such as 'sha256'.")
    if normalized.startswith("shake_"):
        raise InvalidRequestError(f"Hash type {name!r} has no fixed digest size; use e.g. 'sha256'.")
    return normalized


def _parse_expected_hash(value: str) -> tuple[str | None, str]:
    """``"sha256:<hex>"`` or ``"<hex>"`` -> (algorithm or None, lower-case hex)."""
    algorithm, sep, digest = value.strip().rpartition(":")
    digest = digest.lower()
    if not digest or any(char not in "0123456789abcdef" for char in digest):
        raise InvalidRequestError(
            f"expected_hash {value!r} is not '<algorithm>:<hex digest>' or '<hex digest>'.")
    return (_check_hash_type(algorithm) if sep else None), digest


def _check_url(url: str) -> str:
    """Return ``url`` if it is an absolute http(s) URL, else raise InvalidRequestError."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError(f"URL must be a non-empty string, got {url!r}.")
    url = url.strip()
    try:
        parsed = urllib.parse.urlsplit(url)
        host = parsed.hostname
        parsed.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise InvalidRequestError(f"URL {url!r} cannot be parsed: {exc}.") from exc
    if parsed.scheme.lower() not in ("http", "https"):
        raise InvalidRequestError(f"URL {url!r} is not http or https; only those are fetched.")
    if not host:
        raise InvalidRequestError(f"URL {url!r} has no host.")
    return url


def _split_credentials(url: str) -> tuple[str, str | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, ``"user:pw"``); other URLs unchanged."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    credentials = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), credentials


def _check_header(name, value) -> str:
    """Return ``name`` if ``name: value`` can be sent as an HTTP header, else raise
    InvalidRequestError (no line breaks, Latin-1 only, a token-like name)."""
    if not isinstance(name, str) or not isinstance(value, str):
        raise InvalidRequestError(f"Header {name!r} must have a str name and a str value.")
    if not name or any(char in name for char in ": \t\r\n") or any(char in value for char in "\r\n"):
        raise InvalidRequestError(f"Header {name!r} is not a valid header line (empty name, a colon, "
                                  "space or line break).")
    try:
        (name + value).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"Header {name!r} has characters HTTP headers cannot carry "
                                  "(only Latin-1).") from exc
    return name


def _sanitize_filename(name: str | None) -> str | None:
    """A bare file name safe to join under a directory, or None when nothing usable is left.

    Keeps only the last path component (either slash), drops control characters and
    leading dots, so the result can never name a parent, an absolute path or a hidden file.
    """
    if not name:
        return None
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(char for char in last if char.isprintable() and char not in ':*?"<>|')
    cleaned = cleaned.strip().lstrip(".").strip()
    return cleaned[:255] or None


def _filename_from_content_disposition(value: str | None) -> str | None:
    """File name from a Content-Disposition header; ``filename*`` wins over ``filename`` (RFC 6266)."""
    if not value:
        return None
    message = email.message.Message()
    message["Content-Disposition"] = value
    plain = extended = None
    for key, param in message.get_params(header="content-disposition", failobj=[])[1:]:
        if key.lower() != "filename":
            continue
        if isinstance(param, tuple):  # filename*=charset'lang'value, RFC 2231/5987
            extended = email.utils.collapse_rfc2231_value(param)
        else:
            plain = param
    return extended or plain or None


def _guess_filename(content_disposition: str | None, url: str, media_type: str | None) -> str | None:
    """Content-Disposition, else the last URL path segment, else ``download`` + the media type's extension."""
    name = _sanitize_filename(_filename_from_content_disposition(content_disposition))
    if name:
        return name
    path = urllib.parse.urlsplit(url).path
    name = _sanitize_filename(urllib.parse.unquote(path.rsplit("/", 1)[-1]))
    if name:
        return name
    extension = mimetypes.guess_extension(media_type) if media_type else None
    return FALLBACK_FILENAME + extension if extension else None


def _parse_http_date(value: str | None) -> float | None:
    """HTTP date header -> Unix timestamp, or None when absent or unparsable."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _canonical_json(value: Any) -> str:
    """Stable JSON text: sorted keys, no spaces; used for identities and stored dicts."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _encode_body(body: dict | list | bytes | str | None) -> tuple[str | None, bytes | None]:
    """fetch(body=...) -> (kind, bytes sent). Kinds: ``json``, ``text``, ``bytes``."""
    if body is None:
        return None, None
    if isinstance(body, (bytes, bytearray, memoryview)):
        return "bytes", bytes(body)
    if isinstance(body, str):
        return "text", body.encode("utf-8")
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


def _charset_of(media_type_header: str | None) -> str | None:
    """The ``charset`` parameter of a Content-Type header, if any."""
    if not media_type_header:
        return None
    message = email.message.Message()
    message["Content-Type"] = media_type_header
    return message.get_content_charset()


# ---------------------------------------------------------------------------
# Data model (pydantic), with Buffy's names
# ---------------------------------------------------------------------------

Tag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{2,64}$")]
_TAG_ADAPTER = pydantic.TypeAdapter(Tag)


class _Model(BaseModel):
    """Base of the public models: unknown fields are an error, not silently kept."""

    model_config = ConfigDict(extra="forbid")


class _Strategy(_Model):
    """Base of the strategy models; ``strategy_name`` discriminates them."""

    strategy_name: str


class ReCachingStrategy:
    """When ``fetch`` downloads again instead of serving the newest cached version (SPEC §6).

    Build one with the constructors, as in Buffy::

        ReCachingStrategy.never()
        ReCachingStrategy.age(seconds=3600)
        ReCachingStrategy.when_requested()
        ReCachingStrategy.when_remote_changed(check_interval_sec=21600, fallback_max_age_sec=86400)
        ReCachingStrategy.cron(cron="0 0 * * *", run_at_start=True)   # needs buffylite[cron]

    Each returns a pydantic model whose ``strategy_name`` discriminates it; a
    ``RequestCacheConfiguration`` also accepts the equivalent dict.
    """

    @staticmethod
    def never() -> "NeverStrategy":
        """Download once; serve the cached version forever after."""
        return NeverStrategy()

    @staticmethod
    def age(seconds: float = 3600) -> "AgeStrategy":
        """Download again when the newest version was last validated more than ``seconds`` ago."""
        return AgeStrategy(seconds=seconds)

    @staticmethod
    def when_requested() -> "WhenRequestedStrategy":
        """Download on every fetch; serve the cached version if that fails."""
        return WhenRequestedStrategy()

    @staticmethod
    def when_remote_changed(check_interval_sec: float = 21600,
                            fallback_max_age_sec: float = 86400) -> "WhenRemoteChangedStrategy":
        """Ask the origin (conditional GET) at most every ``check_interval_sec``; without
        ETag/Last-Modified behave as ``age(fallback_max_age_sec)``."""
        return WhenRemoteChangedStrategy(check_interval_sec=check_interval_sec,
                                         fallback_max_age_sec=fallback_max_age_sec)

    @staticmethod
    def cron(cron: str = "0 0 * * *", run_at_start: bool = True) -> "CronStrategy":
        """Download when a tick of the cron expression passed since the last validation;
        with ``run_at_start`` also once per opened Cache. Needs ``buffylite[cron]``."""
        return CronStrategy(cron=cron, run_at_start=run_at_start)


class NeverStrategy(_Strategy):
    """Serve the cached version forever."""

    strategy_name: Literal["never"] = "never"


class AgeStrategy(_Strategy):
    """Download again once the newest version is older than ``seconds``."""

    strategy_name: Literal["age"] = "age"
    seconds: float = Field(3600, ge=0)


class WhenRequestedStrategy(_Strategy):
    """Download on every fetch (stale-if-error)."""

    strategy_name: Literal["when_requested"] = "when_requested"


class WhenRemoteChangedStrategy(_Strategy):
    """Conditional GET at most every ``check_interval_sec``."""

    strategy_name: Literal["when_remote_changed"] = "when_remote_changed"
    check_interval_sec: float = Field(21600, ge=0)
    fallback_max_age_sec: float = Field(86400, ge=0)


class CronStrategy(_Strategy):
    """Download on the ticks of a cron expression (needs ``buffylite[cron]``)."""

    strategy_name: Literal["cron"] = "cron"
    cron: str = "0 0 * * *"
    run_at_start: bool = True

    @pydantic.field_validator("cron")
    @classmethod
    def _check_expression(cls, value: str) -> str:
        if _croniter is not None and not _croniter.croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid cron expression")
        return value


AnyStrategy = Annotated[
    Union[NeverStrategy, AgeStrategy, WhenRequestedStrategy, WhenRemoteChangedStrategy, CronStrategy],
    Field(discriminator="strategy_name"),
]


class RequestCacheConfiguration(_Model):
    """How a request is cached: the re-caching strategy and how many versions the GC keeps (SPEC §5)."""

    recaching_strategy: AnyStrategy = Field(default_factory=WhenRemoteChangedStrategy)
    max_cached_unpinned_versions: int = Field(2, ge=1)
    max_cached_pinned_versions: int = Field(10, ge=0)


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


class ResponseContentAttributes(_Model):
    """What the origin's headers said about the content."""

    media_type: Optional[str] = None
    etag: Optional[str] = None
    content_size_bytes: Optional[int] = Field(None, ge=0)
    last_modified_datetime_utc: Optional[dt.datetime] = None
    filename: Optional[str] = None
    content_disposition: Optional[str] = None


class ResponseDownloadStats(_Model):
    """How the download of a version went."""

    downloaded_bytes: int = Field(0, ge=0)
    avg_bytes_per_sec: float = Field(0.0, ge=0)
    download_running_duration_sec: float = Field(0.0, ge=0)
    download_start_time_unix_ts: Optional[float] = None
    total_bytes_to_download: Optional[int] = Field(None, ge=0)
    state: Optional[str] = None
    error: Optional[str] = None


class Response(_Model):
    """One version of a request's content, as stored (SPEC §4).

    The content itself stays in the cache file: ``read()``, ``open()``, ``text()``,
    ``json()`` and ``save_to()`` fetch it through the ``Cache`` that produced this
    object. ``outcome`` (not stored) says how this object came back from the call
    that returned it: ``downloaded``, ``not_modified``, ``duplicate``, ``stale``,
    ``offline`` or ``cached``.
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

    _cache: Any = PrivateAttr(default=None)
    _content_id: Optional[int] = PrivateAttr(default=None)

    @property
    def is_pinned(self) -> bool:
        """True when permanently pinned or while a lease runs."""
        return self.pinned or (self.pinned_until_utc is not None
                               and self.pinned_until_utc.timestamp() > _now())

    def _require_content(self) -> tuple["Cache", int]:
        private = self.__pydantic_private__
        if private["_cache"] is None or private["_content_id"] is None:
            raise NotCachedError(f"Version {self.version} of {self.url} has no stored content "
                                 f"(status {self.status}).")
        return private["_cache"], private["_content_id"]

    def read(self) -> bytes:
        """The whole content as bytes (for large content prefer ``open()``)."""
        cache, content_id = self._require_content()
        return cache._store.read_content(content_id)

    def open(self) -> "_ContentStream":
        """A binary file-like object streaming the content from SQLite in bounded memory.

        Use it as a context manager. It reads from a snapshot: it stays readable until
        closed even if another thread or process deletes this version meanwhile.
        """
        cache, content_id = self._require_content()
        return cache._store.open_content(content_id)

    def text(self, encoding: str | None = None) -> str:
        """The content decoded with ``encoding``, else the Content-Type charset, else UTF-8."""
        charset = encoding or _charset_of(self.content_attributes.media_type) or "utf-8"
        return self.read().decode(charset)

    def json(self) -> Any:
        """The content parsed as JSON."""
        return json.loads(self.read())

    def save_to(self, target: str | os.PathLike | io.IOBase | None = None, *,
                dir: str | os.PathLike | None = None) -> pathlib.Path | None:  # noqa: A002 - SPEC name
        """Write the content to a path, a writable binary file, or a directory.

        ``target`` a path: written atomically (temporary file + rename), the path is
        returned. ``target`` a file object: the bytes are written to it, ``None`` is
        returned. ``dir``: the file is named from ``content_attributes.filename``,
        sanitised so it can never leave ``dir`` (fallback ``download``).
        Raises InvalidRequestError when neither or both of ``target``/``dir`` are given.
        """
        if (target is None) == (dir is None):
            raise InvalidRequestError("save_to() needs exactly one of target or dir=.")
        cache, content_id = self._require_content()
        if hasattr(target, "write"):
            with cache._store.open_content(content_id) as stream:
                for piece in iter(lambda: stream.read(DEFAULT_CHUNK_SIZE_BYTES), b""):
                    target.write(piece)
            return None
        if dir is not None:
            directory = pathlib.Path(dir)
            directory.mkdir(parents=True, exist_ok=True)
            name = _sanitize_filename(self.content_attributes.filename) or FALLBACK_FILENAME
            path = directory / name
        else:
            path = pathlib.Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=".buffylite-", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as output, cache._store.open_content(content_id) as stream:
                for piece in iter(lambda: stream.read(DEFAULT_CHUNK_SIZE_BYTES), b""):
                    output.write(piece)
            os.chmod(temp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would.
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise
        return path


_RESPONSE_FIELD_NAMES = frozenset(Response.model_fields)


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
    """What a garbage collection removed (SPEC §10)."""

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
    lease_owner = peewee.CharField(null=True)          # download lease (§10)
    lease_expires_unix = peewee.DoubleField(null=True)
    resume_from = peewee.TextField(null=True)          # JSON: validators a resume needs

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
#: Placeholder for a value supplied when a prepared statement runs.
_SLOT = "\x00buffylite-slot\x00"


def _slot() -> peewee.Value:
    return peewee.Value(_SLOT, converter=False)


def _columns(model, names: tuple[str, ...]) -> list:
    return [getattr(model, name) for name in names]


def _record(names: tuple[str, ...], values) -> types.SimpleNamespace:
    """A row as a plain object with one attribute per column."""
    return types.SimpleNamespace(**dict(zip(names, values)))


class _Tables:
    """The table models bound to one database (one set per Cache, so two Cache
    objects on two files never share a binding)."""

    def __init__(self, database: peewee.Database):
        for model in _TABLE_MODELS:
            meta = type("Meta", (), {"database": database, "table_name": model._meta.table_name})
            bound = type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})
            setattr(self, model._meta.table_name, bound)
        self.all = [getattr(self, model._meta.table_name) for model in _TABLE_MODELS]


# --- SQLite specifics --------------------------------------------------------


class _Connection(sqlite3.Connection):
    """An sqlite3 connection that can be weakly referenced (the base class cannot)."""


class _SqliteDatabase(peewee.SqliteDatabase):
    """peewee's SqliteDatabase (one connection per thread) remembering, weakly, every
    connection it opens, so that closing the Cache closes all of them while a thread
    that ends still drops its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, factory=_Connection, **kwargs)
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
        for connection in opened:
            with contextlib.suppress(Exception):
                connection.close()


def _sqlite_database(path: pathlib.Path) -> _SqliteDatabase:
    """A peewee database for ``path`` with the pragmas every connection needs.

    WAL lets readers run beside the single writer; ``synchronous=NORMAL`` is safe in
    WAL (a power cut may lose the last commits, never corrupt); foreign keys make
    chunk rows follow their content; the busy timeout makes a writer wait for the lock
    instead of failing with "database is locked". ``check_same_thread`` is off only so
    that ``close_all`` may close other threads' connections; peewee still gives each
    thread its own.
    """
    return _SqliteDatabase(
        str(path),
        timeout=BUSY_TIMEOUT_SEC,
        check_same_thread=False,
        pragmas=[
            ("foreign_keys", 1),
            ("synchronous", "normal"),
            ("journal_size_limit", WAL_SIZE_LIMIT_BYTES),
            ("busy_timeout", int(BUSY_TIMEOUT_SEC * 1000)),
        ],
    )


def _sqlite_check_header(path: pathlib.Path) -> None:
    """Refuse a non-empty file that is not SQLite, before SQLite touches it."""
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


def _sqlite_write_transaction(database: peewee.SqliteDatabase):
    """A write transaction taking the lock up front (``BEGIN IMMEDIATE``): a deferred one
    that later needs to write can fail at once with SQLITE_BUSY in WAL mode instead of
    waiting for the busy timeout."""
    return database.atomic(lock_type="IMMEDIATE")


# --- schema migrations ---------------------------------------------------------


def _migrate_to_1(store: "_Store") -> None:
    """Version 1: the five tables and the salt for sensitive header digests."""
    t = store.tables
    store.db.create_tables([t.meta, t.request, t.content, t.chunk, t.version], safe=True)
    store.tables.meta.create(key="salt", value=secrets.token_hex(32))
    store.tables.meta.create(key="created_unix", value=repr(_now()))


#: Ordered migrations: (schema version reached, function). Each runs in one write transaction.
def _migrate_to_2(store: "_Store") -> None:
    """Version 2: the record of removed versions (for ``as_of`` and lockfiles)."""
    store.db.create_tables([store.tables.removed_version], safe=True)


_MIGRATIONS = ((1, _migrate_to_1), (2, _migrate_to_2))


class _Store:
    """The cache file: connections (one per thread, reopened after fork), transactions,
    error translation, and chunked content I/O."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        _sqlite_check_header(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheFileError(f"Cannot create the directory of the cache file {path}: {exc}.",
                                 path=path) from exc
        self._open_database()
        with self._translated():
            self._upgrade_schema()
            self.salt = bytes.fromhex(self.tables.meta.get_by_id("salt").value)

    # --- connections and transactions ---

    def _open_database(self) -> None:
        self._pid = os.getpid()
        self._statements: dict[str, tuple[str, list]] = {}
        self._local = threading.local()  # per thread: the memo of hot reads, own commits
        self.db = _sqlite_database(self.path)
        self.tables = _Tables(self.db)

    def _ensure_same_process(self) -> None:
        """After fork, drop the parent's connections: sharing one SQLite handle across
        processes corrupts its locking."""
        if os.getpid() != self._pid:
            self._open_database()

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
        """A short IMMEDIATE write transaction. Never hold one across network I/O."""
        self._ensure_same_process()
        try:
            with self._translated(), _sqlite_write_transaction(self.db):
                yield self.tables
        finally:
            # This connection's own commits do not move data_version: count them.
            self._local.writes = getattr(self._local, "writes", 0) + 1

    def close_thread_connection(self) -> None:
        """Close the calling thread's connection (a helper thread is ending)."""
        with contextlib.suppress(Exception):
            self.db.close()

    def close(self) -> None:
        """Close every connection of this store."""
        self._local = threading.local()  # A new connection restarts data_version.
        self.db.close_all()

    # --- schema ---

    def _upgrade_schema(self) -> None:
        application_id, user_version, tables = _sqlite_file_marks(self.db)
        if application_id != APPLICATION_ID and (application_id != 0 or tables):
            raise CacheFileError(f"The file {self.path} is an SQLite database but not a buffylite cache.",
                                 path=self.path)
        if user_version > SCHEMA_VERSION:
            raise CacheFileError(
                f"The cache file {self.path} has schema version {user_version}, newer than this "
                f"buffylite {__version__} understands ({SCHEMA_VERSION}); upgrade buffylite.",
                path=self.path)
        if user_version == SCHEMA_VERSION:
            return
        if user_version == 0:
            _sqlite_prepare_new_file(self.db)
        for target_version, migrate in _MIGRATIONS:
            with _sqlite_write_transaction(self.db):
                # Another process may have migrated while we waited for the lock.
                if _sqlite_file_marks(self.db)[1] >= target_version:
                    continue
                migrate(self)
                _sqlite_mark_file(self.db, target_version)

    def remember_sensitive_headers(self, names: set[str]) -> frozenset[str]:
        """Add ``names`` to the sensitive header names kept in the file and return them
        all: a request's identity must not depend on which Cache object opened the file."""
        meta = self.tables.meta
        with self.reading():
            row = meta.get_or_none(meta.key == "sensitive_headers")
        known = set(json.loads(row.value)) if row is not None else set()
        if not names <= known:
            with self.writing():
                row = meta.get_or_none(meta.key == "sensitive_headers")
                known = set(json.loads(row.value)) if row is not None else set()
                known |= names
                meta.insert(key="sensitive_headers", value=json.dumps(sorted(known))).on_conflict_replace().execute()
        return frozenset(known)

    def schema_version(self) -> int:
        with self.reading():
            return _sqlite_file_marks(self.db)[1]

    def structural_problems(self) -> list[str]:
        """What the database's own checks find wrong (``PRAGMA integrity_check`` and
        ``foreign_key_check``), as sentences; empty when the file is sound."""
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

    # --- prepared statements (the fetch hot path) ---
    #
    # Building SQL through peewee costs far more than running it (about 100 µs per
    # query against a few µs in SQLite), so the queries every fetch runs are built by
    # peewee once per store and then executed with fresh values.

    def _execute(self, name: str, build: Callable[[_Tables], peewee.Query], *values):
        statement = self._statements.get(name)
        if statement is None:
            statement = self._statements[name] = build(self.tables).sql()
        sql, template = statement
        supplied = iter(values)
        # Straight to the driver: peewee's per-statement bookkeeping would double the cost.
        return self.db.connection().execute(
            sql, [next(supplied) if param == _SLOT else param for param in template])

    def request_and_ready_rows(self, identity_key: str):
        """(request record or None, its ready version records newest first), in one query.

        Remembered per thread until the file changes: the change counter tells when any
        other connection (thread or process) committed, and this thread's own commits
        are counted by ``writing()``. Callers must not modify the records.
        """
        self._ensure_same_process()
        local = self._local
        with self._translated():
            stamp = (_sqlite_change_counter(self.db), getattr(local, "writes", 0))
        memo = local.__dict__.setdefault("memo", {})
        remembered = memo.get(identity_key)
        if remembered is not None and remembered[0] == stamp:
            return remembered[1]

        def build(t: _Tables):
            return (t.request.select(*_columns(t.request, _REQUEST_COLUMNS), *_columns(t.version, _VERSION_COLUMNS))
                    .join(t.version, peewee.JOIN.LEFT_OUTER,
                          on=(t.version.request_id == t.request.id) & (t.version.status == "ready"))
                    .where(t.request.identity_key == _slot()).order_by(t.version.version.desc()))
        with self.reading():
            rows = self._execute("request_and_ready_rows", build, identity_key).fetchall()
        split = len(_REQUEST_COLUMNS)
        result = (_record(_REQUEST_COLUMNS, rows[0][:split]) if rows else None,
                  [_record(_VERSION_COLUMNS, row[split:]) for row in rows if row[split] is not None])
        if len(memo) >= IDENTITY_MEMO_SIZE:
            memo.clear()
        memo[identity_key] = (stamp, result)
        return result

    def ready_rows(self, request_id: int) -> list:
        """The request's ready version records, newest first."""
        def build(t: _Tables):
            return (t.version.select(*_columns(t.version, _VERSION_COLUMNS))
                    .where((t.version.request_id == _slot()) & (t.version.status == "ready"))
                    .order_by(t.version.version.desc()))
        with self.reading():
            return [_record(_VERSION_COLUMNS, row)
                    for row in self._execute("ready_rows", build, request_id).fetchall()]

    def removed_versions(self, identity_key: str, after_version: str) -> list:
        """The removed-version records of a request identity newer than ``after_version``,
        newest first (§7 as_of)."""
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
        chunk = self.tables.chunk
        with self.reading():
            size = self._content_size(content_id)
        seq, count, length = -1, 0, 0
        while True:
            with self.reading():
                row = (chunk.select(chunk.seq, chunk.data)
                       .where((chunk.content_id == content_id) & (chunk.seq > seq))
                       .order_by(chunk.seq).limit(1).tuples().first())
            if row is None:
                break
            seq, data = row
            self._check_chunk(content_id, seq, count, data)
            count += 1
            length += len(data)
            yield bytes(data)
        self._check_assembled(content_id, size, length)

    def read_content(self, content_id: int) -> bytes:
        """The whole content, in one query (one snapshot). Raises NotCachedError when the
        content was deleted, IntegrityError when the chunks do not assemble into the
        stored size."""
        def build(t: _Tables):
            # One statement, so the size and the chunks come from one snapshot.
            return (t.content.select(t.content.size_bytes, t.chunk.seq, t.chunk.data)
                    .join(t.chunk, peewee.JOIN.LEFT_OUTER, on=(t.chunk.content_id == t.content.id))
                    .where(t.content.id == _slot()).order_by(t.chunk.seq))
        with self.reading():
            rows = self._execute("read_content_checked", build, content_id).fetchall()
        if not rows:
            raise NotCachedError(f"This version's content is no longer in the cache {self.path} "
                                 "(the version was deleted or collected).")
        size = rows[0][0]
        if rows[0][1] is None:  # no chunk at all
            rows = []
        for count, (_, seq, data) in enumerate(rows):
            self._check_chunk(content_id, seq, count, data)
        data = b"".join([row[2] for row in rows])
        self._check_assembled(content_id, size, len(data))
        return data

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

    def open_content(self, content_id: int) -> "_ContentStream":
        self._ensure_same_process()
        chunk, content = self.tables.chunk, self.tables.content
        exists = content.select(content.id).where(content.id == content_id).sql()
        chunks = chunk.select(chunk.data).where(chunk.content_id == content_id).order_by(chunk.seq).sql()
        with self._translated():
            return _ContentStream(self, exists, chunks)


class _DriverErrors:
    """Context manager turning sqlite3/peewee errors into CacheFileError naming the file.
    A class rather than a generator: it runs twice on every cache hit."""

    __slots__ = ("_store",)

    def __init__(self, store: _Store):
        self._store = store

    def __enter__(self) -> _Tables:
        return self._store.tables

    def __exit__(self, kind, exc, traceback) -> bool:
        if kind is not None and issubclass(kind, (peewee.DatabaseError, peewee.InterfaceError, sqlite3.Error)):
            path = self._store.path
            raise CacheFileError(f"The cache file {path} cannot be used: {exc}.", path=path) from exc
        return False


class _ContentStream(io.RawIOBase):
    """A read-only binary stream over a content's chunks.

    It runs on a connection of its own inside a read transaction opened at creation,
    so it reads one consistent snapshot: deleting the version elsewhere does not
    affect it. Only one chunk is held in memory at a time. Close it (or use ``with``)
    to release the snapshot, which otherwise keeps the WAL from being checkpointed.
    """

    def __init__(self, store: _Store, exists: tuple[str, list], chunks: tuple[str, list]):
        super().__init__()
        self._store = store
        self._db = _sqlite_database(store.path)
        self._db.connect()
        self._db.begin()
        # The first read pins the snapshot; the content must be in it.
        if self._db.execute_sql(*exists).fetchone() is None:
            self.close()
            raise NotCachedError(f"This version's content is no longer in the cache {store.path} "
                                 "(the version was deleted or collected).")
        self._cursor = self._db.execute_sql(*chunks)
        self._current = memoryview(b"")
        self._position = 0
        self._exhausted = False
        self._advance()

    def _advance(self) -> bool:
        if self._exhausted:
            return False
        with self._store._translated():
            row = self._cursor.fetchone()
        if row is None:
            self._exhausted = True
            self._current = memoryview(b"")
            return False
        self._current = memoryview(bytes(row[0]))
        self._position = 0
        return True

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on a closed buffylite stream.")
        if size is None or size < 0:
            return self.readall()
        pieces = []
        while size > 0:
            if self._position >= len(self._current) and not self._advance():
                break
            piece = self._current[self._position:self._position + size]
            self._position += len(piece)
            size -= len(piece)
            pieces.append(piece)
        return b"".join(pieces)

    def readall(self) -> bytes:
        pieces = [self._current[self._position:]]
        while self._advance():
            pieces.append(self._current)
        self._position = len(self._current)
        return b"".join(pieces)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                if getattr(self, "_cursor", None) is not None:
                    self._cursor.close()
                self._db.rollback()
            with contextlib.suppress(Exception):
                self._db.close()
        super().close()


# ---------------------------------------------------------------------------
# HTTP: pool, proxies, one attempt, retry timing
# ---------------------------------------------------------------------------


class _AttemptError(Exception):
    """One download attempt failed. ``retryable`` says whether another attempt may help;
    ``retry_after`` is the origin's requested pause in seconds (or None)."""

    def __init__(self, message: str, *, status_code: int | None = None, retryable: bool,
                 retry_after: float | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after
        self.cause = cause


#: urllib3 follows redirects (stripping credentials when scheme, host or port change,
#: its default ``remove_headers_on_redirect``); every other retry is ours, so that
#: Retry-After, max_retry_wait, resume and the download lease stay under our control.
_URLLIB3_RETRY = Retry(total=None, connect=0, read=0, redirect=MAX_REDIRECTS, status=0, other=0,
                       raise_on_redirect=True, raise_on_status=False)


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
        self._lock = threading.Lock()

    def _manager_for(self, url: str) -> urllib3.PoolManager:
        if os.getpid() != self._pid:  # After fork: never share sockets with the parent.
            self._pid, self._direct, self._proxied = os.getpid(), urllib3.PoolManager(), {}
        parsed = urllib3.util.parse_url(url)
        proxies = urllib.request.getproxies()
        proxy = proxies.get(parsed.scheme) or proxies.get("all")
        if not proxy or _bypasses_proxy(parsed.host or ""):
            return self._direct
        with self._lock:
            if proxy not in self._proxied:
                # Credentials in the proxy URL (http://user:pass@proxy:3128) become
                # Proxy-Authorization, as pip and requests do.
                auth = urllib3.util.parse_url(proxy).auth
                proxy_headers = urllib3.make_headers(
                    proxy_basic_auth=urllib.parse.unquote(auth)) if auth else None
                self._proxied[proxy] = urllib3.ProxyManager(proxy, proxy_headers=proxy_headers)
            return self._proxied[proxy]

    def send(self, method: str, url: str, headers: dict, body: bytes | None) -> urllib3.BaseHTTPResponse:
        """Send one request; the body is left unread. Raises _AttemptError."""
        if not any(name.lower() == "user-agent" for name in headers):
            headers = {**headers, "User-Agent": self.user_agent}
        try:
            return self._manager_for(url).request(
                method.upper(), url, headers=headers, body=body, retries=_URLLIB3_RETRY,
                timeout=self.timeout, preload_content=False, redirect=True)
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

    def close(self) -> None:
        self._direct.clear()
        with self._lock:
            for manager in self._proxied.values():
                manager.clear()
            self._proxied.clear()


def _bypasses_proxy(host: str) -> bool:
    """Does ``NO_PROXY`` exempt ``host``? The standard library's rules (names, domain
    suffixes, ``*``), plus address ranges such as ``10.0.0.0/8`` as requests allows."""
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


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After (delta-seconds or HTTP-date) -> seconds to wait, or None."""
    if not value:
        return None
    try:
        return max(0.0, Retry().parse_retry_after(value))
    except (urllib3.exceptions.InvalidHeader, ValueError, TypeError):
        return None


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
# Cache
# ---------------------------------------------------------------------------


class _Identity:
    """A validated request identity: what makes two fetches the same request (§3)."""

    __slots__ = ("url", "method", "params", "send_headers", "body_kind", "body",
                 "group", "key", "stored_headers")

    def __init__(self, url, method, params, headers, body, group, *, salt: bytes,
                 sensitive: frozenset):
        self.url = _check_url(url)
        if not isinstance(method, str) or method.lower() not in HTTP_METHODS:
            raise InvalidRequestError(f"method must be one of {', '.join(HTTP_METHODS)}, not {method!r}.")
        self.method = method.lower()
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"params must be a dict, not {type(params).__name__}.")
        if headers is not None and not isinstance(headers, dict):
            raise InvalidRequestError(f"headers must be a dict, not {type(headers).__name__}.")
        if not isinstance(group, str) or not group:
            raise InvalidRequestError(f"group must be a non-empty string, not {group!r}.")
        self.params = dict(params) if params else None
        self.send_headers = {_check_header(name, value): value for name, value in (headers or {}).items()}
        self.url, credentials = _split_credentials(self.url)
        if credentials and not any(name.lower() == "authorization" for name in self.send_headers):
            # Sent as Basic auth (as requests does) and, like any Authorization, kept out of
            # the file in clear.
            self.send_headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        self.body_kind, self.body = _encode_body(body)
        self.group = group
        # Sensitive values take part in the identity only as keyed digests.
        self.stored_headers = {
            name: ("hmac-sha256:" + hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()
                   if name.lower() in sensitive else value)
            for name, value in self.send_headers.items()}
        identity = [self.method, self.url, self.params,
                    sorted((name.lower(), value) for name, value in self.stored_headers.items()),
                    self.body_kind, hashlib.sha256(self.body).hexdigest() if self.body is not None else None,
                    self.group]
        self.key = hashlib.sha256(_canonical_json(identity).encode()).hexdigest()

    def request_url(self) -> str:
        """The URL with ``params`` encoded into its query string."""
        if not self.params:
            return self.url
        query = urllib.parse.urlencode(self.params, doseq=True)
        return self.url + ("&" if urllib.parse.urlsplit(self.url).query else "?") + query


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


@dataclasses.dataclass
class _Completed:
    """A fully received content, not yet published."""

    content_id: int
    hash_hex: str
    size: int
    attributes: dict
    stats: dict


class _NotModified:
    """The origin answered 304 to a conditional request."""


class _DownloadFailure(Exception):
    """A due download failed for good (after retries), or its content was rejected."""

    def __init__(self, message: str, *, status_code: int | None = None, cause: object = None,
                 stats: dict | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.cause = cause
        self.stats = stats or {}


class _LeaseLost(Exception):
    """Another process took over this download (our lease had expired)."""


def _is_leased(row, now: float) -> bool:
    return row.pinned_until_unix is not None and row.pinned_until_unix > now


def _is_resumable_row(row) -> bool:
    """Do the stored resume validators and attributes of an abandoned row read back?"""
    try:
        return (isinstance(json.loads(row.resume_from), dict)
                and isinstance(json.loads(row.content_attributes or "{}"), dict))
    except _DAMAGE_ERRORS:
        return False


def _row_tags(row) -> list[str]:
    return json.loads(row.tags) if row.tags else []


def _matches(row, *, version=None, tag=None, pinned=None, now: float) -> bool:
    """Does a version row match the given choices (None = any)?"""
    if version is not None and row.version != version:
        return False
    if tag is not None and tag not in _row_tags(row):
        return False
    if pinned is not None and (row.pinned or _is_leased(row, now)) != pinned:
        return False
    return True


class _LeaseKeeper:
    """Keeps a download lease alive from a thread of its own, every third of its length,
    whatever the download is doing (waiting for headers, stalled, validating), and
    notes when the lease was lost to another process."""

    def __init__(self, store: _Store, claim: _Claim, lease_sec: float):
        self._store = store
        self._claim = claim
        self._lease_sec = lease_sec
        self._stopped = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="buffylite-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._lease_sec / 3):
            try:
                with self._store.writing() as t:
                    renewed = t.version.update(lease_expires_unix=_now() + self._lease_sec).where(
                        (t.version.id == self._claim.row_id)
                        & (t.version.lease_owner == self._claim.owner)).execute()
            except BuffyliteError as exc:  # try again at the next beat
                log.debug("Renewing the download lease failed: %s", exc)
                continue
            if not renewed:
                self.lost = True
                break
        self._store.close_thread_connection()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class _Sink:
    """Receives the body of one download: hashes it and stores it chunk by chunk. Each
    chunk commits in its own short transaction (so a crash loses at most the chunk in
    memory), and only while this download still owns its lease."""

    def __init__(self, cache: "Cache", claim: _Claim, hash_type: str, progress,
                 keeper: _LeaseKeeper):
        self._store = cache._store
        self._claim = claim
        self._hash_type = hash_type
        self._progress = progress
        self._keeper = keeper
        self.content_id: int | None = None
        self.hasher = hashlib.new(hash_type)
        self.offset = 0            # bytes received (stored + buffered)
        self.received_now = 0      # bytes received by this process (for stats)
        self.total: int | None = None
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
            with self._store.writing() as t:
                self._check_ownership(t)
                t.chunk.delete().where(t.chunk.content_id == self.content_id).execute()
                t.content.update(size_bytes=0).where(t.content.id == self.content_id).execute()
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

    def flush(self) -> None:
        """Store the buffered bytes as the next chunk, in one transaction."""
        with self._store.writing() as t:
            self._check_ownership(t)  # First: never write for a download someone took over.
            if self.content_id is None:
                self.content_id = t.content.insert(hash_type=self._hash_type, hash_hex=None).execute()
                t.version.update(content_id=self.content_id).where(
                    t.version.id == self._claim.row_id).execute()
            if self._buffer:
                t.chunk.insert(content_id=self.content_id, seq=self._next_seq,
                               data=bytes(self._buffer)).execute()
                t.content.update(size_bytes=t.content.size_bytes + len(self._buffer)).where(
                    t.content.id == self.content_id).execute()
                self._next_seq += 1
        self._buffer.clear()

    def _check_ownership(self, t: _Tables) -> None:
        """Raise _LeaseLost unless this download still holds its lease. Runs inside the
        caller's write transaction, so nothing can take the lease before it commits."""
        owned = t.version.select().where(
            (t.version.id == self._claim.row_id) & (t.version.lease_owner == self._claim.owner)
            & (t.version.lease_expires_unix > _now())).exists()
        if not owned:
            raise _LeaseLost()


class _Transfer:
    """One due download: attempts with backoff, Retry-After, resume with Range +
    If-Range, and the conditional GET of ``when_remote_changed``. Returns a _Completed
    or _NotModified, or raises _DownloadFailure once retrying cannot help."""

    def __init__(self, cache: "Cache", call: _FetchCall, claim: _Claim, sink: _Sink, conditional_from):
        self._cache = cache
        self._call = call
        self._claim = claim
        self._sink = sink
        self._conditional = (json.loads(conditional_from.content_attributes or "{}")
                             if conditional_from is not None else None)
        self._started = _now()
        self._attributes: dict = {}
        self._validators: dict | None = None   # what If-Range may use, when resumable
        if claim.resume is not None:
            self._attributes = json.loads(claim.resume.content_attributes or "{}")
            self._validators = json.loads(claim.resume.resume_from)
            sink.load_partial(claim.resume.content_id)

    def run(self):
        cache, identity = self._cache, self._call.identity
        headers = dict(identity.send_headers)
        if identity.body_kind == "json" and not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        url = identity.request_url()
        if self._validators and self._sink.offset and self._sink.offset == self._validators.get("total"):
            return self._complete()  # A dead download had stored every byte already.
        attempt, status_code = 0, None
        while True:
            try:
                response = cache._http.send(identity.method, url, self._headers_for_attempt(headers),
                                            identity.body)
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
                if not error.retryable or attempt >= cache._retries:
                    raise self._failure(str(error), status_code, error.cause) from error
                if error.retry_after is not None and error.retry_after > cache._max_retry_wait:
                    raise self._failure(
                        f"{error}; the origin asked to wait {error.retry_after:.0f} s, more than "
                        f"max_retry_wait ({cache._max_retry_wait:g} s)", status_code, error.cause) from error
                wait = (error.retry_after if error.retry_after is not None
                        else _backoff_seconds(attempt, cache._max_retry_wait))
                log.info("Attempt %d for %s failed (%s); retrying in %.1f s.", attempt + 1, url, error, wait)
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
            return _NotModified()
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
        elif 200 <= status < 300 and status != 206:
            if sink.offset:
                sink.restart()  # The origin sent the whole content again (If-Range did not match).
            self._begin(response)
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
                data = response.read1(amount)
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
        sink.flush()
        self._attributes["content_size_bytes"] = sink.offset
        return _Completed(sink.content_id, sink.hasher.hexdigest(), sink.offset, self._attributes,
                          self._stats())

    @staticmethod
    def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
        """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
        try:
            unit, _, spec = (value or "").partition(" ")
            span, _, total = spec.partition("/")
            return int(span.split("-")[0]), (int(total) if total.isdigit() else None)
        except ValueError:
            return None, None

    def _begin(self, response: urllib3.BaseHTTPResponse) -> None:
        """A full body starts: record its attributes and whether it could be resumed."""
        headers = response.headers
        media_type = headers.get("Content-Type")
        last_modified = _parse_http_date(headers.get("Last-Modified"))
        final_url = getattr(response, "url", None) or self._call.identity.url
        self._attributes = ResponseContentAttributes(
            media_type=media_type, etag=headers.get("ETag"),
            last_modified_datetime_utc=_to_datetime(last_modified),
            filename=_guess_filename(headers.get("Content-Disposition"), final_url,
                                     (media_type or "").split(";")[0].strip() or None),
            content_disposition=headers.get("Content-Disposition"),
        ).model_dump(mode="json")
        length = headers.get("Content-Length")
        self._sink.total = int(length) if length and length.isdigit() and not headers.get(
            "Content-Encoding") else None
        self._validators = ({"etag": (headers.get("ETag") if not (headers.get("ETag") or "").startswith("W/")
                                      else None),
                             "last_modified": headers.get("Last-Modified"), "total": self._sink.total}
                            if _is_resumable(headers) else None)
        with self._cache._store.writing() as t:
            t.version.update(status="in_progress", content_attributes=json.dumps(self._attributes),
                             resume_from=json.dumps(self._validators) if self._validators else None,
                             download_stats=json.dumps(self._stats())).where(
                (t.version.id == self._claim.row_id) & (t.version.lease_owner == self._claim.owner)).execute()

    def _stats(self) -> dict:
        duration = max(_now() - self._started, 1e-9)
        return ResponseDownloadStats(
            downloaded_bytes=self._sink.offset, avg_bytes_per_sec=self._sink.received_now / duration,
            download_running_duration_sec=duration, download_start_time_unix_ts=self._started,
            total_bytes_to_download=self._sink.total, state="in_progress").model_dump(mode="json")

    def _failure(self, message: str, status_code: int | None, cause) -> _DownloadFailure:
        self._sink.restart()  # A failed download keeps no content.
        return _DownloadFailure(message, status_code=status_code, cause=cause, stats=self._stats())



class Cache:
    """A versioning HTTP download cache in one SQLite file.

    ``Cache(path=None, *, timeout=30.0, retries=5, max_retry_wait=120.0,
    download_lease_sec=30.0, sensitive_headers=(), user_agent=None)``

    - ``path``: the cache file. ``None`` means ``$BUFFYLITE_CACHE`` if set, else the
      platform's user cache directory (Linux ``$XDG_CACHE_HOME`` or ``~/.cache``, macOS
      ``~/Library/Caches``, Windows ``%LOCALAPPDATA%``) / ``buffylite/cache.sqlite3``.
      Missing directories are created.
    - ``timeout``: seconds for connecting and for each read (or a ``urllib3.Timeout``).
    - ``retries``: retries after the first attempt of a download (0 = try once), on
      connection and read errors and on 429, 500, 502, 503, 504. Waits grow
      exponentially from 0.5 s; ``Retry-After`` (seconds or HTTP date) is honoured.
    - ``max_retry_wait``: no wait exceeds this many seconds; a ``Retry-After`` asking
      for more ends the retries at once (the download fails, and ``fetch`` falls back
      to the cached version).
    - ``download_lease_sec``: an in-flight download holds a lease of this length,
      renewed while bytes arrive. Other threads and processes see it and do not
      download the same request at the same time; once it expires (the process
      died) the download is taken over or reclaimed.
    - ``sensitive_headers``: header names, beyond Authorization, Proxy-Authorization
      and Cookie, whose values never reach the file in clear (a salted digest is
      stored; they still make requests distinct). The names are remembered in the
      file, so every later Cache on it treats them the same way.
    - ``user_agent``: default ``buffylite/<version>``.

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
                 user_agent: str | None = None):
        if not isinstance(timeout, urllib3.Timeout):
            timeout = self._positive_seconds("timeout", timeout)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidRequestError(f"retries must be an integer >= 0, not {retries!r}.")
        self._retries = retries
        self._max_retry_wait = self._positive_seconds("max_retry_wait", max_retry_wait, allow_zero=True)
        self._download_lease_sec = self._positive_seconds("download_lease_sec", download_lease_sec)
        if isinstance(sensitive_headers, str):
            raise InvalidRequestError("sensitive_headers must be a sequence of header names, not a string.")
        self.path = pathlib.Path(path).expanduser() if path is not None else _default_cache_path()
        self._store = _Store(self.path)
        self._sensitive = SENSITIVE_HEADERS | self._store.remember_sensitive_headers(
            {str(name).lower() for name in sensitive_headers})
        self._http = _HttpClient(timeout, user_agent or f"buffylite/{__version__}")
        self._plain_identities: dict[tuple, _Identity] = {}
        self._cron_started: set[int] = set()
        self._cron_lock = threading.Lock()

    @staticmethod
    def _positive_seconds(name: str, value, *, allow_zero: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise InvalidRequestError(f"{name} must be a number of seconds {bound}, not {value!r}.")
        return float(value)

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r})"

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the HTTP pool and this thread's database connection."""
        self._http.close()
        self._store.close()

    # --- identities and loading -------------------------------------------------

    def _identity(self, url, method="get", params=None, headers=None, body=None,
                  group=DEFAULT_GROUP) -> _Identity:
        if params or headers or body is not None:
            return _Identity(url, method, params, headers, body, group, salt=self._store.salt,
                             sensitive=self._sensitive)
        # The plain case (URL, method, group) is memoised: identities are immutable.
        memo_key = (url, method, group)
        if not all(isinstance(part, str) for part in memo_key):
            return _Identity(url, method, None, None, None, group, salt=self._store.salt,
                             sensitive=self._sensitive)  # (raises InvalidRequestError)
        identity = self._plain_identities.get(memo_key)
        if identity is None:
            identity = _Identity(url, method, None, None, None, group, salt=self._store.salt,
                                 sensitive=self._sensitive)
            if len(self._plain_identities) >= IDENTITY_MEMO_SIZE:
                self._plain_identities.clear()
            self._plain_identities[memo_key] = identity
        return identity

    def _find_request(self, t: _Tables, identity: _Identity):
        return t.request.get_or_none(t.request.identity_key == identity.key)

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
        if row.status not in VERSION_STATUSES or not _VERSION_PATTERN.fullmatch(row.version):
            raise ValueError("bad status or version string")
        previous_version = next_version = None
        if row.status == "ready":
            index = bisect.bisect_left(chain, row.version)
            previous_version = chain[index - 1] if index > 0 else None
            next_version = chain[index + 1] if index + 1 < len(chain) else None
        fields = {
            "id": row.id, "request_id": row.request_id, "url": url, "version": row.version,
            "previous_version": previous_version, "next_version": next_version, "status": row.status,
            "cached_datetime_utc": _to_datetime(row.cached_unix),
            "validated_datetime_utc": _to_datetime(row.validated_unix),
            "request_datetime_utc": _to_datetime(row.request_unix),
            "pinned": bool(row.pinned), "pinned_until_utc": _to_datetime(row.pinned_until_unix),
            "tags": _row_tags(row), "content_hash_hex": row.content_hash_hex,
            "content_attributes": ResponseContentAttributes.model_validate_json(row.content_attributes or "{}"),
            "download_stats": ResponseDownloadStats.model_validate_json(row.download_stats or "{}"),
            "outcome": outcome}
        return _trusted_response(fields, {"_cache": self, "_content_id": row.content_id})

    def _responses(self, rows: list, url: str, ready_rows: list, outcome: str | None = "cached"):
        chain = sorted(row.version for row in ready_rows)
        return [self._response(row, url, chain, outcome) for row in rows]

    def _response_for_row_id(self, t: _Tables, row_id: int, outcome: str = "cached") -> Response:
        row = t.version.get_or_none(t.version.id == row_id)
        if row is None:
            raise NotCachedError(f"Version row {row_id} is no longer in the cache {self.path}.")
        request = t.request.get_by_id(row.request_id)
        return self._responses([row], request.url, self._store.ready_rows(row.request_id), outcome)[0]

    def _configuration_of(self, request_row) -> RequestCacheConfiguration:
        # Parsed once per row object (rows are re-read whenever the file changes).
        parsed = getattr(request_row, "_parsed_configuration", None)
        if parsed is None or parsed[0] != request_row.cache_configuration:
            try:
                configuration = RequestCacheConfiguration.model_validate_json(request_row.cache_configuration)
            except _DAMAGE_ERRORS as exc:
                raise _DamagedValueError(
                    f"The stored cache configuration of {request_row.url!r} (request {request_row.id}) in "
                    f"the cache {self.path} is damaged and cannot be read.", path=self.path) from exc
            parsed = (request_row.cache_configuration, configuration)
            with contextlib.suppress(AttributeError):
                request_row._parsed_configuration = parsed
        return parsed[1]

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
              progress: Callable[[int, int | None], None] | None = None) -> Response:
        """Return a version of ``url``'s content, downloading it when the strategy says so.

        Identity: ``method`` ("get", "post", "put"; any case), ``params`` (dict, encoded
        into the query string), ``headers`` (dict), ``body`` (dict sent as JSON, bytes or
        str) and ``group`` make a request distinct. ``description`` and
        ``documentation_link`` are stored with it.

        Caching: ``cache_configuration`` (a RequestCacheConfiguration or its dict) is
        stored with the request and replaces a stored one; ``None`` keeps the stored one
        (default: ``when_remote_changed()``, 2 unpinned and 10 pinned versions kept).
        ``validation_hash_type``: hashlib algorithm for content hashes (default sha256).

        Choice of version (SPEC §7): ``force_version``/``force_tag``/``force_pinned``
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

        Returns a Response whose ``outcome`` is ``downloaded``, ``not_modified``,
        ``duplicate``, ``stale``, ``offline`` or ``cached``.

        Raises InvalidRequestError (bad arguments; nothing written), NotCachedError
        (nothing suitable cached and no download allowed), FetchError (the download
        failed and nothing suitable is cached), IntegrityError (the download does not
        match ``expected_hash`` and no cached version does), CacheFileError.
        """
        identity = self._identity(url, method, params, headers, body, group)
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
            pin_for=None if pin_for is None else self._positive_seconds("pin_for", pin_for),
            as_of=self._check_as_of(as_of), validator=validator, progress=progress)
        if expected_hash is not None:
            call.expected_algorithm, call.expected_hash = _parse_expected_hash(expected_hash)
        for name in ("validator", "progress"):
            if getattr(call, name) is not None and not callable(getattr(call, name)):
                raise InvalidRequestError(f"{name} must be callable.")
        if call.configuration is not None:
            self._require_strategy_support(call.configuration)
        return self._fetch(call)

    @staticmethod
    def _require_strategy_support(configuration: RequestCacheConfiguration) -> None:
        if configuration.recaching_strategy.strategy_name == "cron" and _croniter is None:
            raise InvalidRequestError(
                "The cron strategy needs the optional extra: pip install 'buffylite[cron]'.")

    def _check_expected_hash(self, call: _FetchCall, request) -> None:
        """The expected digest must be of the request's hash type, and of its length.
        A new request takes the expected hash's algorithm as its hash type."""
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
            return RequestCacheConfiguration.model_validate(value)
        raise InvalidRequestError("cache_configuration must be a RequestCacheConfiguration or a dict, "
                                  f"not {type(value).__name__}.")

    @staticmethod
    def _check_tag(tag: str | None, name: str = "tag") -> str | None:
        if tag is None:
            return None
        try:
            return _TAG_ADAPTER.validate_python(tag)
        except pydantic.ValidationError as exc:
            raise InvalidRequestError(f"{name} {tag!r} is not 2-64 characters of A-Z, a-z, 0-9, _ "
                                      "and -.") from exc

    @staticmethod
    def _check_version_string(name: str, value: str | None) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or len(value) != 20 or not value.isdigit():
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
        started = _now()
        while True:
            request, ready = self._store.request_and_ready_rows(call.identity.key)
            now = _now()
            eligible = [row for row in ready
                        if call.expected_hash is None or row.content_hash_hex == call.expected_hash]
            if call.expected_hash is not None:
                self._check_expected_hash(call, request)
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
            plan = self._stored_plan(strategy, newest, request, now) if eligible else "download"
            if plan == "serve":
                return self._serve(call, request, ready, "cached")

            # A download (or a conditional check) is due: claim it, unless someone else runs it.
            seen = (newest.id, newest.validated_unix) if newest is not None else None
            claim = self._claim(call, strategy, started, seen)
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

    def _plan(self, strategy, newest, request, now: float) -> str:
        """Per SPEC §6: "serve" the newest ready version, "download", or "conditional" GET."""
        if newest is None:
            return "download"
        age = now - (newest.validated_unix or 0.0)
        name = strategy.strategy_name
        if name == "never":
            return "serve"
        if name == "age":
            return "download" if age > strategy.seconds else "serve"
        if name == "when_requested":
            return "download"
        if name == "when_remote_changed":
            if age < strategy.check_interval_sec:
                return "serve"
            attributes = json.loads(newest.content_attributes or "{}")
            if attributes.get("etag") or attributes.get("last_modified_datetime_utc"):
                return "conditional"
            return "download" if age > strategy.fallback_max_age_sec else "serve"
        # cron
        if strategy.run_at_start:
            with self._cron_lock:
                if request.id not in self._cron_started:
                    self._cron_started.add(request.id)
                    return "download"
        next_tick = _croniter.croniter(strategy.cron, _to_datetime(newest.validated_unix)).get_next(float)
        return "download" if next_tick <= now else "serve"

    def _stored_plan(self, strategy, newest, request, now: float) -> str:
        """``_plan`` on values read from the file: a damaged one makes this request unusable."""
        try:
            return self._plan(strategy, newest, request, now)
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"Version {getattr(newest, 'version', '?')!r} of {request.url!r} in the cache {self.path} "
                f"is damaged and cannot be read: {type(exc).__name__}.", path=self.path) from exc

    def _choose(self, call: _FetchCall, ready: list, now: float, *, hard: bool = False):
        """The newest ready row satisfying the call's choices (§7), or None."""
        try:
            return self._choose_of(call, ready, now, hard=hard)
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

    def _choose_of(self, call: _FetchCall, ready: list, now: float, *, hard: bool = False):
        candidates = [row for row in ready
                      if call.expected_hash is None or row.content_hash_hex == call.expected_hash]
        if hard:
            for row in candidates:
                if (_matches(row, version=call.force_version, tag=call.force_tag,
                             pinned=call.force_pinned, now=now)
                        and (call.as_of is None or (row.cached_unix is not None
                                                    # Compared as shown: microsecond datetimes.
                                                    and _to_datetime(row.cached_unix) <= call.as_of))):
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

    def _serve(self, call: _FetchCall, request, ready: list, outcome: str, *, hard: bool = False):
        """Return a cached version without downloading (leasing it first if pin_for)."""
        if request is None and call.as_of is not None:
            self._refuse_removed_at(call, None)
        if request is None:
            raise NotCachedError(f"{call.identity.url} is not in the cache {self.path}"
                                 + (" (offline)." if call.offline else "."))
        if call.pin_for is not None:
            with self._store.writing() as t:
                ready = self._store.ready_rows(request.id)
                chosen = self._choose(call, ready, _now(), hard=hard)
                if chosen is not None:
                    self._extend_lease(t, chosen, call.pin_for)
        else:
            chosen = self._choose(call, ready, _now(), hard=hard)
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

    @staticmethod
    def _extend_lease(t: _Tables, row, seconds: float) -> None:
        """Lease ``row`` for ``seconds`` from now; never shortens a running lease."""
        until = _now() + seconds
        if row.pinned_until_unix is None or row.pinned_until_unix < until:
            t.version.update(pinned_until_unix=until).where(t.version.id == row.id).execute()
            row.pinned_until_unix = until

    def _update_request_settings(self, call: _FetchCall, request) -> None:
        """Store a changed configuration / description / hash type passed to fetch()."""
        changes = self._setting_changes(call, request)
        if changes:
            with self._store.writing() as t:
                t.request.update(**changes).where(t.request.id == request.id).execute()

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
               seen: tuple | None = None) -> _Claim:
        try:
            return self._claim_of(call, strategy, started, seen)
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"A stored version of {call.identity.url} in the cache {self.path} is damaged and "
                f"cannot be read: {type(exc).__name__}.", path=self.path) from exc

    def _claim_of(self, call: _FetchCall, strategy, started: float | None, seen: tuple | None) -> _Claim:
        """Create the request if new and take the download lease, in one transaction.

        The decision to download is taken again here, on the rows this transaction
        sees: when another thread or process made a ready version meanwhile that this
        call may serve (validated since ``started``, or fresh per ``strategy``; ``seen``
        is the newest ready version's (id, validated time) the first decision saw), the
        claim is ``settled`` and nothing is downloaded. A live lease on another row
        means someone else is downloading: report it. An abandoned row with resumable
        partial content is taken over.
        """
        identity = call.identity
        owner = f"{os.getpid()}:{threading.get_ident()}:{secrets.token_hex(6)}"
        with self._store.writing() as t:
            now = _now()
            request = self._find_request(t, identity)
            if request is None:
                configuration = call.configuration or RequestCacheConfiguration()
                request_id = t.request.insert(
                    identity_key=identity.key, url=identity.url, http_method=identity.method,
                    group_name=identity.group, http_header_fields=_canonical_json(identity.stored_headers),
                    http_query_params=_canonical_json(identity.params) if identity.params else None,
                    body_kind=identity.body_kind, http_request_body=identity.body,
                    description=call.description, documentation_link=call.documentation_link,
                    validation_hash_type=call.hash_type or DEFAULT_HASH_TYPE,
                    cache_configuration=configuration.model_dump_json(), created_unix=now).execute()
            else:
                request_id = request.id
                changes = self._setting_changes(call, request)
                if changes:
                    t.request.update(**changes).where(t.request.id == request_id).execute()
                if started is not None and self._settled_meanwhile(call, request, strategy, started,
                                                                   seen, now):
                    return _Claim(request_id, settled=True)
            in_flight = list(t.version.select().where(
                (t.version.request_id == request_id) & t.version.status.in_(IN_FLIGHT_STATUSES))
                .order_by(t.version.version.desc()))
            for row in in_flight:
                if (row.lease_expires_unix or 0) > now:
                    return _Claim(request_id, other_row_id=row.id)
            lease = {"lease_owner": owner, "lease_expires_unix": now + self._download_lease_sec}
            for row in in_flight:
                # A row whose resume data is damaged is not resumed (GC reclaims it).
                if row.content_id is not None and row.resume_from and _is_resumable_row(row):
                    t.version.update(**lease).where(t.version.id == row.id).execute()
                    return _Claim(request_id, row.id, owner, resume=row)
            newest = (t.version.select(peewee.fn.MAX(t.version.version))
                      .where(t.version.request_id == request_id).scalar())
            row_id = t.version.insert(
                request_id=request_id, version=_next_version_string(now, newest), status="wait",
                request_unix=now, **lease).execute()
            return _Claim(request_id, row_id, owner)

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
            with self._store.reading() as t:
                row = t.version.get_or_none(t.version.id == row_id)
                settlement = t.request.select(t.request.last_settlement).where(
                    t.request.id == request_id).scalar()
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
                    or (row.lease_expires_unix or 0) <= _now():
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
            if eligible:
                log.warning("Downloading %s failed (%s); serving the cached version.",
                            call.identity.url, settlement["error"])
                return self._serve(call, request, ready, "stale")
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
        partial content (cancelled), and return what §7 says to return."""
        with self._store.reading() as t:
            request = t.request.get_by_id(claim.request_id)
        with self._cron_lock:  # A download in this Cache is the cron strategy's run at start.
            self._cron_started.add(claim.request_id)
        keeper = _LeaseKeeper(self._store, claim, self._download_lease_sec)
        sink = _Sink(self, claim, request.validation_hash_type, call.progress, keeper)
        try:
            try:
                kind, completed, failure = self._download_and_check(call, claim, request, sink,
                                                                    conditional_from)
            finally:
                keeper.stop()
            return self._finish(call, claim, request, kind, completed=completed, failure=failure)
        except _LeaseLost:
            log.warning("The download of %s was taken over by another process; waiting for it.",
                        request.url)
            return self._fetch(call)
        except BaseException:
            # Cancelled (progress raised, KeyboardInterrupt...): keep what arrived for a resume.
            self._abandon(claim, sink)
            raise

    def _download_and_check(self, call: _FetchCall, claim: _Claim, request, sink: _Sink,
                            conditional_from) -> tuple[str, _Completed | None, _DownloadFailure | None]:
        """Run the transfer, then the content checks (expected hash, validator).
        Returns how the download settles: ("not_modified" | "completed" | "failed", ...)."""
        try:
            result = _Transfer(self, call, claim, sink, conditional_from).run()
            if isinstance(result, _NotModified):
                return "not_modified", None, None
            if call.expected_hash is not None and result.hash_hex != call.expected_hash:
                raise _DownloadFailure(f"hash mismatch: expected {call.expected_hash}, got {result.hash_hex}",
                                       stats=result.stats, cause="hash mismatch")
            if call.validator is not None and not self._is_duplicate_of_newest(claim.request_id, result):
                self._run_validator(call, claim, request, result)
            return "completed", result, None
        except _DownloadFailure as failure:
            failure.stats.setdefault("downloaded_bytes", sink.offset)
            return "failed", None, failure

    def _is_duplicate_of_newest(self, request_id: int, result: _Completed) -> bool:
        ready = self._store.ready_rows(request_id)
        return bool(ready) and ready[0].content_hash_hex == result.hash_hex

    def _run_validator(self, call: _FetchCall, claim: _Claim, request, result: _Completed) -> None:
        """Show the new, complete content to the user's validator before it is published."""
        # The version string the content will be published under is given now, so the
        # validator sees the version fetch() returns (and the one a failure is recorded as).
        with self._store.writing() as t:
            row = t.version.get_or_none(t.version.id == claim.row_id)
            if row is None or row.lease_owner != claim.owner:
                raise _LeaseLost()
            row.version = claim.version = self._next_version_of(t, request.id, row.id, _now())
            t.version.update(version=row.version).where(t.version.id == row.id).execute()
        row.content_attributes = json.dumps(result.attributes)
        row.content_hash_hex = result.hash_hex
        candidate = self._response(row, request.url, [])
        candidate._content_id = result.content_id
        try:
            call.validator(candidate)
        except Exception as exc:  # noqa: BLE001 - any exception from the validator rejects the content
            raise _DownloadFailure(f"rejected by validator: {exc}", stats=result.stats,
                                   cause=exc) from exc

    def _abandon(self, claim: _Claim, sink: _Sink) -> None:
        """Store what is buffered and let the lease lapse now, keeping the partial content
        so a later fetch can resume it (or gc() reclaim it)."""
        with contextlib.suppress(Exception):
            sink.flush()
        with contextlib.suppress(Exception), self._store.writing() as t:
            t.version.update(lease_expires_unix=0.0).where(
                (t.version.id == claim.row_id) & (t.version.lease_owner == claim.owner)).execute()

    def _finish(self, call: _FetchCall, claim: _Claim, request, kind: str, *,
                completed: _Completed | None = None, failure: _DownloadFailure | None = None) -> Response:
        """Settle a download in one transaction: publish it (ready or duplicate), record the
        304 or the failure, collect garbage for the request, then choose the version to
        return and lease it (pin_for), so no GC can slip in between."""
        with self._store.writing() as t:
            now = _now()
            row = t.version.get_or_none(t.version.id == claim.row_id)
            if row is None or row.lease_owner != claim.owner:
                raise _LeaseLost()
            final = {"version": self._next_version_of(t, request.id, row.id, now, keep=claim.version),
                     "lease_owner": None,
                     "lease_expires_unix": None, "resume_from": None}
            ready = self._store.ready_rows(request.id)
            newest = ready[0] if ready else None
            if kind == "not_modified":
                t.version.delete().where(t.version.id == row.id).execute()
                if newest is not None:
                    t.version.update(validated_unix=now).where(t.version.id == newest.id).execute()
                outcome, settled_id = "not_modified", newest.id if newest else None
            elif kind == "completed":
                content_id = self._settle_content(t, row, request.validation_hash_type, completed)
                stats = dict(completed.stats, state="ready")
                if newest is not None and newest.content_id == content_id:
                    stats["state"] = "duplicate"
                    t.version.update(status="duplicate", content_id=content_id,
                                     content_hash_hex=completed.hash_hex, cached_unix=now,
                                     content_attributes=json.dumps(completed.attributes),
                                     download_stats=json.dumps(stats), **final).where(
                        t.version.id == row.id).execute()
                    t.version.update(validated_unix=now).where(t.version.id == newest.id).execute()
                    outcome, settled_id = "duplicate", newest.id
                else:
                    t.version.update(status="ready", content_id=content_id,
                                     content_hash_hex=completed.hash_hex, cached_unix=now,
                                     validated_unix=now, content_attributes=json.dumps(completed.attributes),
                                     download_stats=json.dumps(stats), **final).where(
                        t.version.id == row.id).execute()
                    outcome, settled_id = "downloaded", row.id
            else:
                stats = dict(failure.stats, state="failed", error=str(failure))
                t.version.update(status="failed", content_id=None, cached_unix=None,
                                 download_stats=json.dumps(stats), **final).where(
                    t.version.id == row.id).execute()
                if row.content_id is not None:
                    self._delete_unreferenced_contents(t, {row.content_id})
                outcome, settled_id = "stale", None
            # Tell the calls waiting for this download how it ended (its row may be gone).
            settlement = {"row_id": row.id, "outcome": "failed" if kind == "failed" else outcome,
                          "error": str(failure) if failure else None,
                          "status_code": failure.status_code if failure else None,
                          "hash_mismatch": bool(failure and failure.cause == "hash mismatch")}
            t.request.update(last_settlement=json.dumps(settlement)).where(
                t.request.id == request.id).execute()
            # Garbage collection of this request, before choosing what to return.
            freed = 0
            if kind != "not_modified":
                freed = self._collect_request(t, request.id, now)[1]
            ready = self._store.ready_rows(request.id)
            chosen = self._choose(call, ready, now)
            if chosen is not None and call.pin_for is not None:
                self._extend_lease(t, chosen, call.pin_for)
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

    @staticmethod
    def _next_version_of(t: _Tables, request_id: int, row_id: int, now: float,
                         keep: str | None = None) -> str:
        """The version string for row ``row_id`` of a request: ``keep`` (given earlier)
        while it is still newer than every other row's, else one for ``now`` after them.
        Runs inside the caller's write transaction."""
        others = (t.version.select(peewee.fn.MAX(t.version.version))
                  .where((t.version.request_id == request_id) & (t.version.id != row_id)).scalar())
        if keep is not None and (others is None or keep > others):
            return keep
        return _next_version_string(now, others)

    def _settle_content(self, t: _Tables, row, hash_type: str, completed: _Completed) -> int:
        """Make the received content addressable by its hash, or drop it for the identical
        content already stored. Returns the content id the version points to."""
        existing = t.content.get_or_none((t.content.hash_type == hash_type)
                                         & (t.content.hash_hex == completed.hash_hex))
        if existing is not None and existing.id != completed.content_id:
            t.version.update(content_id=existing.id).where(t.version.id == row.id).execute()
            t.content.delete().where(t.content.id == completed.content_id).execute()
            return existing.id
        t.content.update(hash_hex=completed.hash_hex, size_bytes=completed.size).where(
            t.content.id == completed.content_id).execute()
        return completed.content_id

    def _fall_back(self, call: _FetchCall, request, chosen, ready: list, failure: _DownloadFailure):
        """A due download failed: serve the newest suitable cached version (stale), else raise."""
        if chosen is not None:
            log.warning("Downloading %s failed (%s); serving the cached version %s.",
                        request.url, failure, chosen.version)
            return self._responses([chosen], request.url, ready, "stale")[0]
        if failure.cause == "hash mismatch":
            raise IntegrityError(f"The content downloaded from {request.url} does not match the "
                                 f"expected hash ({failure}) and no cached version does.")
        raise FetchError(f"Downloading {request.url} failed: {failure}.", url=request.url,
                         status_code=failure.status_code, cause=failure.cause or str(failure))

    # --- garbage collection -------------------------------------------------------------

    def _collect_request(self, t: _Tables, request_id: int, now: float) -> tuple[dict, int]:
        """Apply the GC rules of §10 to one request. Runs inside the caller's write
        transaction; reads only this request's rows (index on request_id). A damaged
        stored value of the request raises _DamagedValueError (nothing is removed)."""
        try:
            return self._collect_request_of(t, request_id, now)
        except _DAMAGE_ERRORS as exc:
            raise _DamagedValueError(
                f"A stored version of request {request_id} in the cache {self.path} is damaged and "
                f"cannot be read: {type(exc).__name__}.", path=self.path) from exc

    def _collect_request_of(self, t: _Tables, request_id: int, now: float) -> tuple[dict, int]:
        request = t.request.get_or_none(t.request.id == request_id)
        if request is None:
            return {}, 0
        configuration = self._configuration_of(request)
        rows = list(t.version.select().where(t.version.request_id == request_id)
                    .order_by(t.version.version.desc()))
        ready = [row for row in rows if row.status == "ready"]
        newest_id = ready[0].id if ready else None
        removals: dict = {}
        permanent = [row for row in ready if row.pinned]
        for row in permanent[configuration.max_cached_pinned_versions:]:
            if row.id != newest_id and not _is_leased(row, now):
                removals[row] = "pinned"
        unpinned = [row for row in ready if not row.pinned and not _is_leased(row, now)]
        for row in unpinned[configuration.max_cached_unpinned_versions:]:
            if row.id != newest_id:
                removals[row] = "unpinned"
        for row in [row for row in rows if row.status == "failed"][1:]:
            removals[row] = "failed"
        for row in rows:
            if row.status == "duplicate":
                removals[row] = "duplicate"
            elif row.status in IN_FLIGHT_STATUSES and (row.lease_expires_unix or 0) <= now:
                removals[row] = "abandoned"
        if not removals:
            return {}, 0
        self._record_removed(t, request, [row for row in removals if row.status == "ready"], "collected", now)
        t.version.delete().where(t.version.id.in_([row.id for row in removals])).execute()
        freed = self._delete_unreferenced_contents(
            t, {row.content_id for row in removals if row.content_id is not None})
        counts: dict[str, int] = {}
        for reason in removals.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts, freed

    @staticmethod
    def _record_removed(t: _Tables, request, rows: list, reason: str, now: float) -> None:
        """Remember ready versions that leave the cache (§7 ``as_of``): version, hash,
        size, cached and removed times. Runs in the transaction that removes them."""
        if not rows:
            return
        contents = {content_id: (hash_type, size) for content_id, hash_type, size in t.content.select(
            t.content.id, t.content.hash_type, t.content.size_bytes).where(
            t.content.id.in_([row.content_id for row in rows if row.content_id is not None])).tuples()}
        t.removed_version.insert_many([
            {"identity_key": request.identity_key, "request_id": request.id, "version": row.version,
             "hash_type": contents.get(row.content_id, (request.validation_hash_type,))[0],
             "hash_hex": row.content_hash_hex,
             "size_bytes": contents.get(row.content_id, (None, None))[1], "cached_unix": row.cached_unix,
             "removed_unix": now, "reason": reason} for row in rows]).execute()

    @staticmethod
    def _delete_unreferenced_contents(t: _Tables, content_ids: set) -> int:
        """Delete those contents no version points to (their chunks follow); return bytes freed."""
        freed = 0
        for content_id in content_ids:
            if t.version.select().where(t.version.content_id == content_id).exists():
                continue
            content = t.content.get_or_none(t.content.id == content_id)
            if content is not None:
                freed += content.size_bytes or 0
                t.content.delete().where(t.content.id == content_id).execute()
        return freed

    def gc(self, url: str | None = None, *, method: str = "get", params: dict | None = None,
           headers: dict | None = None, body=None, group: str = DEFAULT_GROUP) -> GCReport:
        """Collect garbage (§10) for one request, or for every request when ``url`` is None.

        Keeps the newest ``max_cached_unpinned_versions`` ready unpinned versions, the
        newest ``max_cached_pinned_versions`` permanently pinned ones, every leased one
        and always the newest ready one; removes duplicate rows, failed rows but the
        newest per request, and downloads whose lease expired (their process died).
        Content nothing refers to any more is deleted and the file shrinks.
        Returns a GCReport (removed per reason, bytes freed, file size before/after).
        """
        report = GCReport(file_size_before=self._store.file_size())
        with self._store.reading() as t:
            if url is None:
                request_ids = [row[0] for row in t.request.select(t.request.id).tuples()]
            else:
                request = self._find_request(t, self._identity(url, method, params, headers, body, group))
                request_ids = [request.id] if request is not None else []
        for request_id in request_ids:
            # One short transaction per request keeps other writers moving.
            try:
                with self._store.writing() as t:
                    counts, freed = self._collect_request(t, request_id, _now())
            except _DamagedValueError as exc:
                # Only this request cannot be collected; verify() reports it.
                log.warning("%s Not collected.", exc)
                continue
            for reason, count in counts.items():
                report.removed[reason] += count
            report.bytes_freed += freed
        self._store.give_back_free_pages(checkpoint=True)
        report.file_size_after = self._store.file_size()
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
            cache_configuration=self._configuration_of(row))

    def get_request(self, url: str, *, method: str = "get", params: dict | None = None,
                    headers: dict | None = None, body=None, group: str = DEFAULT_GROUP) -> Request | None:
        """The stored Request for this identity, or None when it was never fetched."""
        identity = self._identity(url, method, params, headers, body, group)
        with self._store.reading() as t:
            row = self._find_request(t, identity)
            return self._request_model(row) if row is not None else None

    def requests(self, group: str | None = None) -> list[Request]:
        """Every stored request (of ``group`` when given), oldest first."""
        with self._store.reading() as t:
            query = t.request.select().order_by(t.request.id)
            if group is not None:
                query = query.where(t.request.group_name == group)
            rows = list(query)
        found = []
        for row in rows:
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
        with self._store.reading() as t:
            request = self._find_request(t, identity)
            if request is None:
                return []
            query = t.version.select().where(t.version.request_id == request.id)
            if status is not None:
                query = query.where(t.version.status == status)
            rows = list(query.order_by(t.version.version.desc()))
            ready = [row for row in rows if row.status == "ready"] if status in (None, "ready") \
                else self._store.ready_rows(request.id)
        now = _now()
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
        with self._store.reading() as t:
            request = self._find_request(t, identity)
            ready = self._store.ready_rows(request.id) if request is not None else []
        chosen = next((row for row in ready if version in ("latest", row.version)), None)
        if chosen is None:
            raise NotCachedError(f"No ready version {version!r} of {identity.url} in {self.path}.")
        return self._responses([chosen], request.url, ready)[0]

    def stats(self) -> dict:
        """Counts and sizes: path, file_size_bytes (main file + WAL), requests, versions per
        status, content_bytes and unique_contents (each distinct content once), partial_bytes
        (downloads kept for resume), schema_version, sqlite_version."""
        with self._store.reading() as t:
            per_status = dict.fromkeys(VERSION_STATUSES, 0)
            for status, count in (t.version.select(t.version.status, peewee.fn.COUNT(t.version.id))
                                  .group_by(t.version.status).tuples()):
                if status in per_status:  # a damaged status is verify()'s to report
                    per_status[status] = count
            complete = t.content.hash_hex.is_null(False)
            content_bytes, unique = (t.content.select(peewee.fn.COALESCE(peewee.fn.SUM(t.content.size_bytes), 0),
                                                      peewee.fn.COUNT(t.content.id))
                                     .where(complete).tuples().get())
            partial = (t.content.select(peewee.fn.COALESCE(peewee.fn.SUM(t.content.size_bytes), 0))
                       .where(~complete).scalar())
            requests = t.request.select().count()
        return {"path": str(self.path), "file_size_bytes": self._store.file_size(),
                "requests": requests, "versions": per_status, "content_bytes": int(content_bytes),
                "unique_contents": int(unique), "partial_bytes": int(partial),
                "schema_version": self._store.schema_version(),
                "sqlite_version": peewee.sqlite3.sqlite_version}

    # --- pins, leases, tags ---------------------------------------------------------------

    def _row_of(self, t: _Tables, response: Response):
        if not isinstance(response, Response):
            raise InvalidRequestError(f"Expected a Response, not {type(response).__name__}.")
        row = t.version.get_or_none(t.version.id == response.id)
        if row is None:
            raise NotCachedError(f"Version {response.version} of {response.url} is no longer in {self.path}.")
        return row

    def pin(self, response: Response, *, seconds: float | None = None) -> Response:
        """Pin a version: permanently (``seconds=None``; only the pinned GC may remove it,
        beyond ``max_cached_pinned_versions``) or as a lease of ``seconds`` that no GC
        touches while it runs (extending, never shortening, a running lease)."""
        if seconds is not None:
            seconds = self._positive_seconds("seconds", seconds)
        with self._store.writing() as t:
            row = self._row_of(t, response)
            if seconds is None:
                t.version.update(pinned=True).where(t.version.id == row.id).execute()
            else:
                self._extend_lease(t, row, seconds)
            return self._response_for_row_id(t, row.id)

    def unpin(self, response: Response) -> Response:
        """Clear the permanent pin and any lease of a version."""
        with self._store.writing() as t:
            row = self._row_of(t, response)
            t.version.update(pinned=False, pinned_until_unix=None).where(t.version.id == row.id).execute()
            return self._response_for_row_id(t, row.id)

    @contextlib.contextmanager
    def lease(self, response: Response, seconds: float) -> Iterator[Response]:
        """Lease a version for the ``with`` block (at most ``seconds``); on exit put back
        the lease end that was there before, unless someone extended it further meanwhile."""
        seconds = self._positive_seconds("seconds", seconds)
        with self._store.writing() as t:
            row = self._row_of(t, response)
            before = row.pinned_until_unix
            self._extend_lease(t, row, seconds)
            ours = row.pinned_until_unix
            leased = self._response_for_row_id(t, row.id)
        try:
            yield leased
        finally:
            with self._store.writing() as t:
                t.version.update(pinned_until_unix=before).where(
                    (t.version.id == row.id) & (t.version.pinned_until_unix == ours)).execute()

    def tag(self, response: Response, tag: str) -> Response:
        """Add a tag (2-64 characters of A-Z a-z 0-9 _ -) to a version."""
        tag = self._check_tag(tag)
        with self._store.writing() as t:
            row = self._row_of(t, response)
            tags = _row_tags(row)
            if tag not in tags:
                t.version.update(tags=json.dumps(tags + [tag])).where(t.version.id == row.id).execute()
            return self._response_for_row_id(t, row.id)

    def untag(self, response: Response, tag: str) -> Response:
        """Remove a tag from a version (no error if it was not there)."""
        tag = self._check_tag(tag)
        with self._store.writing() as t:
            row = self._row_of(t, response)
            tags = [existing for existing in _row_tags(row) if existing != tag]
            t.version.update(tags=json.dumps(tags)).where(t.version.id == row.id).execute()
            return self._response_for_row_id(t, row.id)

    # --- maintenance ----------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the whole cache (§10) and report what is wrong; never "all intact" while
        something is.

        Runs the database's own checks (``PRAGMA integrity_check`` and
        ``foreign_key_check``) and reads every stored value back; what fails goes to
        ``problems``. Re-hashes every stored content: a version whose content no longer
        matches its hash (or cannot be read) leaves the chain and becomes ``failed`` with
        the error "content corrupted". ``corrupted`` lists every such version, found by
        this call or an earlier one, until it is deleted or collected.
        """
        report = VerifyReport()
        try:
            report.problems.extend(self._store.structural_problems())
        except CacheFileError as exc:
            report.problems.append(str(exc))
        try:
            with self._store.reading() as t:
                contents = list(t.content.select(t.content.id, t.content.hash_type, t.content.hash_hex,
                                                 t.content.size_bytes)
                                .where(t.content.hash_hex.is_null(False)).tuples())
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
                    self._mark_corrupted(content_id, hash_hex)
                except CacheFileError as exc:
                    report.problems.append(f"Content {content_id} ({hash_type}:{hash_hex}) is corrupted "
                                           f"and cannot be marked so: {exc}")
        report.problems.extend(self._damaged_values())
        report.corrupted.extend(self._corrupted_versions(report.problems))
        return report

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

    def _mark_corrupted(self, content_id: int, hash_hex) -> None:
        """Take the versions of a corrupted content out of the chain (failed, "content
        corrupted"), remember them as removed (§7 as_of), and make the content
        unaddressable so a new identical download does not reuse it."""
        with self._store.writing() as t:
            t.content.update(hash_hex=None).where(t.content.id == content_id).execute()
            rows = list(t.version.select().where((t.version.content_id == content_id)
                                                 & (t.version.status == "ready")))
            now = _now()
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
                    self._record_removed(t, request, [row], "corrupted", now)
        log.info("Content %s is corrupted; %d version(s) marked failed.", hash_hex, len(rows))

    def _corrupted_versions(self, problems: list[str]) -> list[Response]:
        """Every version marked "content corrupted" that is still stored."""
        found = []
        try:
            with self._store.reading() as t:
                rows = list(t.version.select().where(
                    (t.version.status == "failed") & t.version.download_stats.contains(CORRUPTED_ERROR))
                    .order_by(t.version.request_id, t.version.version))
                urls = dict(t.request.select(t.request.id, t.request.url).tuples())
        except CacheFileError as exc:
            problems.append(f"The versions marked corrupted cannot be listed: {exc}")
            return found
        for row in rows:
            try:
                response = self._responses([row], urls.get(row.request_id, "?"), [], "cached")[0]
            except CacheFileError as exc:
                problems.append(str(exc))
                continue
            if response.download_stats.error == CORRUPTED_ERROR:
                found.append(response)
        return found

    def _damaged_values(self) -> list[str]:
        """Read every stored request and version back as the API would; name those that fail."""
        problems = []
        try:
            with self._store.reading() as t:
                requests = list(t.request.select())
                versions = list(t.version.select())
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
        with self._store.writing() as t:
            request = self._find_request(t, identity)
            if request is None:
                return 0
            content_ids = {row[0] for row in t.version.select(t.version.content_id).where(
                (t.version.request_id == request.id) & t.version.content_id.is_null(False)).tuples()}
            self._record_removed(t, request, list(t.version.select().where(
                (t.version.request_id == request.id) & (t.version.status == "ready"))), "deleted", _now())
            removed = t.version.delete().where(t.version.request_id == request.id).execute()
            t.request.delete().where(t.request.id == request.id).execute()
            freed = self._delete_unreferenced_contents(t, content_ids)
        if freed:
            self._store.give_back_free_pages(checkpoint=False)
        return removed


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

#: Exit statuses of the command line (SPEC §13).
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
    """``never | age:SECONDS | when_requested | when_remote_changed[:CHECK[:FALLBACK]] | cron:EXPR``."""
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
    except (ValueError, pydantic.ValidationError) as exc:
        raise _UsageError(f"--strategy {text!r}: {exc}") from exc
    raise _UsageError(f"--strategy {text!r} is not never, age:SECONDS, when_requested, "
                      "when_remote_changed[:CHECK[:FALLBACK]] or cron:EXPR.")


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
        self._started = time.monotonic()
        self._last_drawn = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if _tqdm is not None:
            if self._bar is None:
                self._bar = _tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
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
    progress = _ProgressBar("download") if sys.stderr.isatty() and not args.quiet else None
    try:
        response = cache.fetch(args.url, cache_configuration=configuration, offline=args.offline or None,
                               expected_hash=args.expected_hash, force_version=args.force_version,
                               prefer_tag=args.prefer_tag, pin_for=args.pin_for, progress=progress,
                               **identity)
    finally:
        if progress is not None:
            progress.close()
    if args.pin:
        response = cache.pin(response).model_copy(update={"outcome": response.outcome})
    for tag in args.tag or ():
        response = cache.tag(response, tag).model_copy(update={"outcome": response.outcome})
    saved = None
    if args.output or args.dir:
        saved = response.save_to(args.output) if args.output else response.save_to(dir=args.dir)
    elif not args.json:
        with response.open() as stream:
            for piece in iter(lambda: stream.read(DEFAULT_CHUNK_SIZE_BYTES), b""):
                sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()
    if args.json:
        data = response.model_dump(mode="json")
        data["saved_to"] = str(saved) if saved else None
        _emit(args, data, lambda: None)
    elif not args.quiet:
        where = f" -> {saved}" if saved else ""
        sys.stderr.write(f"{response.url}: version {response.version} ({response.outcome}){where}\n")
    return 0


def _cmd_versions(cache: Cache, args) -> int:
    status = None if args.status == "all" else args.status
    versions = cache.versions(args.url, status=status, **_identity_arguments(args))
    _emit(args, [response.model_dump(mode="json") for response in versions],
          lambda: _print_table([_version_row(response) for response in versions], sys.stdout))
    return 0


def _cmd_requests(cache: Cache, args) -> int:
    requests = cache.requests(args.group)
    rows = [{"id": request.id, "group": request.group_name, "method": request.http_method,
             "strategy": request.cache_configuration.recaching_strategy.strategy_name, "url": request.url}
            for request in requests]
    _emit(args, [request.model_dump(mode="json") for request in requests],
          lambda: _print_table(rows, sys.stdout))
    return 0


def _cmd_show(cache: Cache, args) -> int:
    response = cache.get(args.url, args.version or "latest", **_identity_arguments(args))
    data = response.model_dump(mode="json", exclude={"outcome"})

    def human() -> None:
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
    _emit(args, {"url": args.url, "versions_removed": removed},
          lambda: sys.stdout.write(f"{args.url}: {removed} versions removed\n"))
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


def _build_parser() -> argparse.ArgumentParser:
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

    identity = argparse.ArgumentParser(add_help=False)
    identity.add_argument("--method", default="get", help="get, post or put (default get)")
    identity.add_argument("--header", action="append", metavar="'K: V'", help="request header (repeatable)")
    identity.add_argument("--param", action="append", metavar="k=v", help="query parameter (repeatable)")
    identity.add_argument("--group", default=DEFAULT_GROUP, help=f"request group (default {DEFAULT_GROUP})")
    common = [global_options(True)]

    parser = argparse.ArgumentParser(
        prog="buffylite", parents=[global_options(False)],
        description="A versioning HTTP download cache in one SQLite file.")
    parser.add_argument("--version", action="version", version=f"buffylite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fetch_parser = commands.add_parser("fetch", parents=common + [identity],
                                       help="fetch a URL through the cache (content to stdout)")
    fetch_parser.add_argument("url")
    output = fetch_parser.add_mutually_exclusive_group()
    output.add_argument("-o", "--output", metavar="FILE", help="write the content to FILE")
    output.add_argument("-d", "--dir", metavar="DIR", help="write the content into DIR under its file name")
    fetch_parser.add_argument("--strategy", help="never | age:SECONDS | when_requested | "
                                                 "when_remote_changed[:CHECK[:FALLBACK]] | cron:EXPR")
    fetch_parser.add_argument("--keep", type=int, metavar="N", help="unpinned versions to keep")
    fetch_parser.add_argument("--keep-pinned", type=int, metavar="N", help="pinned versions to keep")
    fetch_parser.add_argument("--pin", action="store_true", help="pin the returned version permanently")
    fetch_parser.add_argument("--pin-for", type=float, metavar="SECONDS", help="lease the returned version")
    fetch_parser.add_argument("--tag", action="append", metavar="T", help="tag the returned version")
    fetch_parser.add_argument("--offline", action="store_true", help="never touch the network")
    fetch_parser.add_argument("--expected-hash", metavar="HASH", help="'sha256:<hex>' or '<hex>'")
    fetch_parser.add_argument("--force-version", metavar="V", help="return exactly this version")
    fetch_parser.add_argument("--prefer-tag", metavar="T", help="prefer the newest version with this tag")
    fetch_parser.set_defaults(handler=_cmd_fetch)

    versions_parser = commands.add_parser("versions", parents=common + [identity], help="list versions")
    versions_parser.add_argument("url")
    versions_parser.add_argument("--status", default="ready", choices=VERSION_STATUSES + ("all",))
    versions_parser.set_defaults(handler=_cmd_versions)

    requests_parser = commands.add_parser("requests", parents=common, help="list stored requests")
    requests_parser.add_argument("--group")
    requests_parser.set_defaults(handler=_cmd_requests)

    show_parser = commands.add_parser("show", parents=common + [identity], help="show one version")
    show_parser.add_argument("url")
    show_parser.add_argument("version", nargs="?")
    show_parser.set_defaults(handler=_cmd_show)

    pin_parser = commands.add_parser("pin", parents=common + [identity], help="pin a version")
    pin_parser.add_argument("url")
    pin_parser.add_argument("version")
    pin_parser.add_argument("--for", dest="seconds", type=float, metavar="SECONDS",
                            help="a lease of SECONDS instead of a permanent pin")
    pin_parser.set_defaults(handler=_cmd_pin)

    unpin_parser = commands.add_parser("unpin", parents=common + [identity], help="unpin a version")
    unpin_parser.add_argument("url")
    unpin_parser.add_argument("version")
    unpin_parser.set_defaults(handler=_cmd_unpin)

    for name, text in (("tag", "tag a version"), ("untag", "remove a tag from a version")):
        tag_parser = commands.add_parser(name, parents=common + [identity], help=text)
        tag_parser.add_argument("url")
        tag_parser.add_argument("version")
        tag_parser.add_argument("tag")
        tag_parser.set_defaults(handler=_cmd_tag)

    commands.add_parser("gc", parents=common, help="collect garbage, shrink the file").set_defaults(
        handler=_cmd_gc)
    commands.add_parser("verify", parents=common, help="re-hash all content").set_defaults(
        handler=_cmd_verify)
    refresh_parser = commands.add_parser("refresh", parents=common, help="apply every request's strategy now")
    refresh_parser.add_argument("--group")
    refresh_parser.set_defaults(handler=_cmd_refresh)

    delete_parser = commands.add_parser("delete", parents=common + [identity], help="forget a request")
    delete_parser.add_argument("url")
    delete_parser.set_defaults(handler=_cmd_delete)

    commands.add_parser("info", parents=common, help="cache file facts and counts").set_defaults(
        handler=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Exit statuses: 0 success; 1 other errors; 2 usage (bad option or value); 3 not
    cached; 4 integrity; 5 download failed with nothing cached. With ``--json`` an
    error is also printed on stdout as ``{"error": {"type", "message", "url",
    "status_code"}}``.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("buffylite: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING)
    try:
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
            with contextlib.suppress(OSError):
                sys.stdout.write(json.dumps(_error_object(exc, message)) + "\n")
                sys.stdout.flush()
        sys.stderr.write(f"buffylite: error: {message}\n")
        return status
    except KeyboardInterrupt:
        sys.stderr.write("buffylite: interrupted\n")
        return 130
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    # Under ``python -m buffylite`` this file runs as ``__main__``; alias it so an
    # ``import buffylite`` elsewhere gets this same module, not a second copy.
    sys.modules.setdefault("buffylite", sys.modules[__name__])
    sys.exit(main())
