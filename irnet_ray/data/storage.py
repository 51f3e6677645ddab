"""Storage URIs -> pyarrow filesystems: local paths, ``file://`` and ``s3://`` (AWS or any
S3-compatible endpoint such as MinIO, Ceph or moto).

Everything here is plain Python + pyarrow (no Ray, no torch), so Ray Data tasks, training workers
and the command line all see the same behaviour. boto3 is used for one call pyarrow cannot make:
the conditional PutObject of :func:`create_exclusive`.

URIs
    * ``/abs/path``, ``rel/path``, ``~/path``: local (returned as absolute paths).
    * ``file:///abs/path``: local; listings keep the ``file://`` form.
    * ``s3://bucket/key``: S3. The endpoint is ``StorageOptions.endpoint_url``, else the
      ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` environment variable, else AWS itself.
    Anything else with ``scheme://`` (``gs://``, ``http://``, ...) raises ``ValueError``.

Credentials come from the usual AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, instance metadata). They are never stored
in :class:`StorageOptions` and never appear in error messages (secrets found in the environment
are additionally scrubbed from any message that passes through this module).

Errors are :class:`StorageError` subclasses with messages meant for the person who typed the URI:
:class:`StorageNotFound` (also a ``FileNotFoundError``), :class:`StorageAccessDenied` (also a
``PermissionError``) and :class:`StorageUnreachable` (also a ``ConnectionError``). Unreachable
endpoints fail within a few seconds (short connect timeout, at most ``max_attempts`` tries).
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

__all__ = [
    "StorageOptions",
    "StorageError",
    "StorageNotFound",
    "StorageAccessDenied",
    "StorageUnreachable",
    "SUPPORTED_SCHEMES",
    "resolve",
    "read_bytes",
    "write_bytes",
    "create_exclusive",
    "exists",
    "file_times",
    "file_time",
    "delete_file",
    "list_files",
    "join",
    "parent",
    "basename",
    "is_s3",
    "resolve_relative",
    "normalize",
]

SUPPORTED_SCHEMES = ("local path", "file://", "s3://")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


# --------------------------------------------------------------------------------------
# options and errors


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Holds no credentials (they come from the AWS chain).

    ``endpoint_url``: an S3-compatible endpoint such as ``http://minio:9000`` (scheme required);
    ``None`` uses ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` if set, else AWS.
    ``region``: the bucket's region (``None``: the AWS chain; on AWS itself the bucket's region
    is looked up once per bucket). ``anonymous``: unsigned requests (public buckets).
    ``connect_timeout`` / ``request_timeout`` (seconds) and ``max_attempts`` (tries per request,
    including the first) keep an unreachable store from hanging a job.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    connect_timeout: float = 3.0
    request_timeout: float = 30.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            _parse_endpoint(self.endpoint_url)  # validates
        if float(self.connect_timeout) <= 0 or float(self.request_timeout) <= 0:
            raise ValueError("StorageOptions timeouts must be > 0 seconds")
        if int(self.max_attempts) < 1:
            raise ValueError(f"StorageOptions.max_attempts must be >= 1, got {self.max_attempts}")

    def effective_endpoint(self) -> str | None:
        """The endpoint URL actually used: the option, else the environment, else ``None`` (AWS)."""
        if self.endpoint_url:
            return self.endpoint_url
        for var in _ENDPOINT_ENV_VARS:
            value = os.environ.get(var, "").strip()
            if value:
                return value
        return None


class StorageError(Exception):
    """A storage operation failed; ``str(error)`` is meant for the user, ``uri`` names the target."""

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(_scrub(message))
        self.uri = uri

    def __str__(self) -> str:  # OSError subclasses would otherwise format errno/filename
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        return (type(self), (self.args[0] if self.args else "", self.uri))


class StorageNotFound(StorageError, FileNotFoundError):
    """The file, object, folder or bucket does not exist."""


class StorageAccessDenied(StorageError, PermissionError):
    """The credentials (or their absence) do not allow the operation."""


class StorageUnreachable(StorageError, ConnectionError):
    """The object store could not be contacted (wrong endpoint, network, DNS, TLS, timeout)."""


def _scrub(message: str) -> str:
    """Remove secrets present in the environment and noisy request ids from a message."""
    for var in _SECRET_ENV_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            message = message.replace(secret, "***")
    message = re.sub(r"\s*\(Request ID: [^)]*\)", "", message)
    return message


# --------------------------------------------------------------------------------------
# URI parsing


def _scheme(uri: str) -> str | None:
    m = _SCHEME_RE.match(uri)
    return m.group(1).lower() if m else None


def _check_uri(uri: str) -> str | None:
    if not isinstance(uri, (str, os.PathLike)):
        raise TypeError(f"storage URI must be a string or path, got {type(uri).__name__}")
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("storage URI is empty")
    scheme = _scheme(uri)
    if scheme is None and re.match(r"^s3:/?(?!/)", uri, re.IGNORECASE):
        raise ValueError(f"malformed S3 URI {uri!r}: write s3://bucket/key")
    if scheme not in (None, "file", "s3"):
        raise ValueError(
            f"unsupported storage scheme '{scheme}://' in {uri!r}; supported: local paths, "
            "file:// and s3:// (use s3:// with StorageOptions.endpoint_url for S3-compatible stores)"
        )
    return scheme


def is_s3(uri: str) -> bool:
    return _scheme(str(uri)) == "s3"


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (``bucket``, ``key``); the key may be empty."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket: write s3://bucket/key")
    return bucket, key


def _local_path(uri: str) -> str:
    if _scheme(uri) == "file":
        rest = uri[len("file://") :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ValueError(f"file:// URI {uri!r} must hold an absolute path (file:///abs/path)")
        return os.path.normpath(rest)
    return os.path.abspath(os.path.expanduser(uri))


def _parse_endpoint(endpoint: str) -> tuple[str, str]:
    """``http://host:port`` -> (``http``, ``host:port``)."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"S3 endpoint {endpoint!r} must look like http://host:port or https://host[:port]"
        )
    if "@" in parts.netloc:
        raise ValueError("S3 endpoint must not contain credentials; use the AWS credential chain")
    if parts.path not in ("", "/"):
        raise ValueError(f"S3 endpoint {endpoint!r} must not have a path (got {parts.path!r})")
    return parts.scheme, parts.netloc


def _endpoint_label(options: StorageOptions) -> str:
    endpoint = options.effective_endpoint()
    if endpoint:
        return endpoint.rstrip("/")
    return "AWS S3" + (f" (region {options.region})" if options.region else "")


@functools.lru_cache(maxsize=128)
def _aws_bucket_region(bucket: str) -> str | None:
    try:
        return pafs.resolve_s3_region(bucket)
    except Exception:  # unknown bucket / offline: let the real request report the problem
        return None


def _s3_filesystem(options: StorageOptions, bucket: str) -> pafs.S3FileSystem:
    kwargs: dict = dict(
        anonymous=bool(options.anonymous),
        connect_timeout=float(options.connect_timeout),
        request_timeout=float(options.request_timeout),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(options.max_attempts)),
        # Small writes become one PutObject (otherwise pyarrow always uses a multipart upload).
        allow_delayed_open=True,
    )
    endpoint = options.effective_endpoint()
    if endpoint:
        scheme, netloc = _parse_endpoint(endpoint)
        kwargs.update(endpoint_override=netloc, scheme=scheme)
    region = options.region
    if region is None and not endpoint and not options.anonymous and not (
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    ):
        region = _aws_bucket_region(bucket)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, options: StorageOptions = StorageOptions()) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (pyarrow filesystem, path inside it).

    ``s3://bucket/key`` -> (``S3FileSystem``, ``bucket/key``); local paths and ``file://`` URIs
    -> (``LocalFileSystem``, absolute path). Other schemes raise ``ValueError``.
    """
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    if scheme == "s3":
        bucket, key = _split_s3(uri)
        return _s3_filesystem(options, bucket), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), _local_path(uri)


# --------------------------------------------------------------------------------------
# error translation

_NOT_FOUND_CODES = ("NO_SUCH_KEY", "NO_SUCH_BUCKET", "RESOURCE_NOT_FOUND", "HTTP status 404", "NoSuchKey")
_DENIED_CODES = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "EXPIRED_TOKEN",
    "INVALID_CLIENT_TOKEN_ID",
    "UNRECOGNIZED_CLIENT",
    "MISSING_AUTHENTICATION_TOKEN",
    "HTTP status 403",
    "HTTP status 401",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
)
_UNREACHABLE_CODES = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not connect",
    "Couldn't connect",
    "Couldn't resolve",
    "Could not resolve",
    "Connection refused",
    "timed out",
    "Timeout was reached",
    "REQUEST_TIMEOUT",
    "SSL",
    "certificate",
    "HTTP status 5",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
)


def _detail(message: str) -> str:
    message = _scrub(message)
    m = re.search(r"AWS Error (\w+) during (\w+) operation: (.*)", message, re.DOTALL)
    if m:
        code, op, text = m.groups()
        text = text.strip().rstrip(".")
        if "Details:" in text:
            text = text.split("Details:", 1)[1].strip()
        return f"{text} ({code} in {op})" if text and text != "No response body" else f"{code} in {op}"
    return message.strip()


def _translate(exc: BaseException, uri: str, options: StorageOptions) -> StorageError:
    """Map a pyarrow / OS error about ``uri`` to a :class:`StorageError` for the user."""
    if isinstance(exc, StorageError):
        return exc
    remote = is_s3(uri)
    message = str(exc)
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri} is a folder, expected a file", uri)
    if isinstance(exc, NotADirectoryError):
        return StorageNotFound(f"no such folder: {uri} (a file is in the way)", uri)
    if isinstance(exc, FileNotFoundError) or any(c in message for c in _NOT_FOUND_CODES):
        if remote:
            bucket, _ = _split_s3(uri)
            hint = f" (bucket '{bucket}' does not exist)" if "NO_SUCH_BUCKET" in message else ""
            return StorageNotFound(f"no such file or bucket: {uri}{hint}", uri)
        return StorageNotFound(f"no such file or directory: {uri}", uri)
    if isinstance(exc, PermissionError) or any(c in message for c in _DENIED_CODES):
        if remote:
            how = "anonymous access is not allowed here" if options.anonymous else (
                "check credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
                "and the bucket policy"
            )
            return StorageAccessDenied(f"access denied to {uri}: {how} [{_detail(message)}]", uri)
        return StorageAccessDenied(f"access denied to {uri}: check file permissions", uri)
    if remote and (isinstance(exc, (ConnectionError, TimeoutError)) or any(c in message for c in _UNREACHABLE_CODES)):
        return StorageUnreachable(
            f"cannot reach the object store at {_endpoint_label(options)}: {_detail(message)}", uri
        )
    return StorageError(f"storage error for {uri}: {_detail(message)}", uri)


class _translating:
    """Context manager: re-raise OS / pyarrow errors as StorageError about ``uri``."""

    def __init__(self, uri: str, options: StorageOptions) -> None:
        self.uri, self.options = uri, options

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (StorageError, ValueError, TypeError)):
            return False
        if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
            raise _translate(exc, self.uri, self.options) from None
        return False


# --------------------------------------------------------------------------------------
# operations


def read_bytes(uri: str, options: StorageOptions = StorageOptions()) -> bytes:
    """The whole content of a file or object."""
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    with _translating(uri, options):
        if scheme == "s3":
            fs, path = resolve(uri, options)
            if path.endswith("/") or "/" not in path:
                raise StorageError(f"{uri} is a bucket or folder, expected a file", uri)
            with fs.open_input_stream(path) as f:
                return f.read()
        with open(_local_path(uri), "rb") as f:
            return f.read()


def write_bytes(uri: str, data: bytes, options: StorageOptions = StorageOptions()) -> None:
    """Write ``data`` atomically: readers see the old content or the new one, never a part.

    S3: one PutObject for payloads below pyarrow's part size (10 MiB), a multipart upload above
    (objects appear only when complete either way); the bucket must exist.
    Local: parent folders are created, data goes to a temporary file in the same folder, which
    is then ``os.replace``-d onto the target.
    """
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    data = bytes(data) if not isinstance(data, (bytes, bytearray, memoryview)) else data
    with _translating(uri, options):
        if scheme == "s3":
            fs, path = resolve(uri, options)
            if "/" not in path or path.endswith("/"):
                raise ValueError(f"cannot write to {uri!r}: an S3 URI for a file needs a key")
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        path = _local_path(uri)
        tmp = _temporary_copy(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise


def _temporary_copy(path: str, data: bytes) -> str:
    """``data`` in a synced temporary file next to ``path`` (parents created), with the
    permissions a new file gets; returns its path. Renamed or linked onto ``path`` by callers,
    so readers never see a partial file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def create_exclusive(uri: str, data: bytes, options: StorageOptions = StorageOptions()) -> bool:
    """Create ``uri`` with ``data`` only if nothing is there yet; returns ``False`` (and changes
    nothing) when it exists. Of two concurrent creators exactly one gets ``True``.

    This is what makes a commit record or a lease safe against a second writer: a plain write
    would silently replace the other writer's record.

    S3: one PutObject with ``If-None-Match: *`` (AWS S3 since August 2024, and S3-compatible
    stores that implement it); HTTP 412 means the object exists, 409 that another conditional
    write of the same key is in progress (the other writer wins). A store that ignores the header
    would make this a plain write: check yours (the project's tests check moto's).
    Local: the data goes to a temporary file in the same folder, which is then hard-linked to the
    target (``link`` fails if the target exists), so readers never see a partial file. On a
    filesystem without hard links an ``O_CREAT | O_EXCL`` create is used (exclusive, not atomic
    for readers).
    """
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    data = bytes(data)
    if scheme == "s3":
        return _s3_create_exclusive(uri, data, options)
    path = _local_path(uri)
    with _translating(uri, options):
        tmp = _temporary_copy(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return _create_with_o_excl(path, data)
        finally:
            _remove_quietly(tmp)
        return True


#: errno values of ``link`` on filesystems without hard links (some FUSE, SMB, FAT mounts).
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _create_with_o_excl(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _boto3_client(options: StorageOptions, bucket: str):
    """A boto3 S3 client configured like :func:`_s3_filesystem` (endpoint, region, timeouts,
    attempts, anonymous). A new session per call: boto3's default session is not thread-safe."""
    import boto3
    import botocore
    from botocore.config import Config

    config = Config(
        connect_timeout=float(options.connect_timeout),
        read_timeout=float(options.request_timeout),
        retries={"max_attempts": int(options.max_attempts), "mode": "standard"},
        **({"signature_version": botocore.UNSIGNED} if options.anonymous else {}),
    )
    endpoint = options.effective_endpoint()
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and not endpoint and not options.anonymous:
        region = _aws_bucket_region(bucket)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


#: S3 error codes of a conditional write that lost: the object exists / another write is under way.
_EXISTS_CODES = ("PreconditionFailed", "ConditionalRequestConflict")


def _s3_create_exclusive(uri: str, data: bytes, options: StorageOptions) -> bool:
    import botocore.exceptions

    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"cannot write to {uri!r}: an S3 URI for a file needs a key")
    try:
        _boto3_client(options, bucket).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _EXISTS_CODES or status in (409, 412):
            return False
        raise _translate(OSError(f"AWS Error {code} during PutObject operation: {error.get('Message', '')} "
                                 f"[{_boto_status_hint(code, status)}]"), uri, options) from None  # fmt: skip
    except botocore.exceptions.BotoCoreError as exc:  # no connection, timeouts, no credentials
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            raise StorageAccessDenied(f"access denied to {uri}: no AWS credentials found", uri) from None
        raise StorageUnreachable(f"cannot reach the object store at {_endpoint_label(options)}: {exc}", uri) from None
    return True


def _boto_status_hint(code: str, status: int | None) -> str:
    """The pyarrow-style code :func:`_translate` classifies by, from a boto3 error code / status."""
    if code in ("NoSuchBucket", "NoSuchKey") or status == 404:
        return "NO_SUCH_BUCKET" if code == "NoSuchBucket" else "HTTP status 404"
    if status in (401, 403):
        return f"HTTP status {status}"
    if status is not None and status >= 500:
        return "HTTP status 5xx"
    return f"HTTP status {status}"


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def exists(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    """Whether a file, folder (S3: a prefix with objects under it) or bucket exists.

    Access-denied and unreachable stores raise instead of answering ``False``.
    """
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    if scheme != "s3":
        return os.path.exists(_local_path(uri))
    fs, path = resolve(uri, options)
    with _translating(uri, options):
        info = fs.get_file_info(path)
    return info.type != pafs.FileType.NotFound


def file_times(uri: str, options: StorageOptions = StorageOptions()) -> dict[str, float]:
    """``{uri: last modified (POSIX seconds)}`` of every file under ``uri`` (recursive), as the
    store's own clock says (S3: ``LastModified``); a missing folder gives ``{}``.

    Compare these only with other times from the same store (e.g. :func:`file_time` of a file
    written at the moment of interest), never with this machine's clock.
    """
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    fs, path = resolve(uri, options)
    with _translating(uri, options):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if scheme == "s3":
        named = {f"s3://{i.path}": i for i in infos}
    else:
        prefix = "file://" if scheme == "file" else ""
        named = {prefix + i.path: i for i in infos}
    return {name: i.mtime.timestamp() for name, i in named.items() if i.type == pafs.FileType.File and i.mtime}


def file_time(uri: str, options: StorageOptions = StorageOptions()) -> float | None:
    """Last modification of one file in the store's clock (POSIX seconds); ``None`` if missing."""
    uri = os.fspath(uri)
    _check_uri(uri)
    fs, path = resolve(uri, options)
    with _translating(uri, options):
        info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else None


def delete_file(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    """Delete one file or object; returns whether it existed (a missing file is not an error)."""
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    with _translating(uri, options):
        if scheme == "s3":
            fs, path = resolve(uri, options)
            if fs.get_file_info(path).type != pafs.FileType.File:
                return False
            fs.delete_file(path)
            return True
        try:
            os.unlink(_local_path(uri))
        except FileNotFoundError:
            return False
        return True


def list_files(
    uri: str,
    options: StorageOptions = StorageOptions(),
    suffixes: Iterable[str] | None = None,
) -> list[str]:
    """All files under ``uri`` (recursive), sorted, as URIs of the same form as ``uri``.

    ``suffixes`` (e.g. ``(".jpg", ".png")``) keeps names ending in one of them, ignoring case.
    A ``uri`` naming a single file lists that file. A missing folder raises ``StorageNotFound``.
    Local listings follow symbolic links (data sets are often assembled from links).
    """
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None

    def keep(name: str) -> bool:
        return wanted is None or name.lower().endswith(wanted)

    if scheme == "s3":
        fs, path = resolve(uri, options)
        with _translating(uri, options):
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                return [uri] if keep(path) else []
            if info.type == pafs.FileType.NotFound:
                raise StorageNotFound(f"no such file, folder or bucket: {uri}", uri)
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        out = [f"s3://{i.path}" for i in infos if i.type == pafs.FileType.File and keep(i.path)]
        return sorted(out)

    root = _local_path(uri)
    prefix = "file://" if scheme == "file" else ""
    if os.path.isfile(root):
        return [prefix + root] if keep(root) else []
    if not os.path.isdir(root):
        raise StorageNotFound(f"no such file or directory: {uri}", uri)
    out: list[str] = []
    seen: set[str] = set()
    with _translating(uri, options):
        for folder, dirs, files in os.walk(root, followlinks=True, onerror=_raise):
            real = os.path.realpath(folder)
            if real in seen:  # a link cycle
                dirs[:] = []
                continue
            seen.add(real)
            for name in files:
                if keep(name):
                    out.append(prefix + os.path.join(folder, name))
    return sorted(out)


def _raise(exc: OSError) -> None:
    raise exc


# --------------------------------------------------------------------------------------
# URI arithmetic (no I/O)


def _normalize_key(uri: str, key: str) -> str:
    trailing = key.endswith("/")
    parts: list[str] = []
    for part in key.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError(f"path {uri!r} goes above the bucket root")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts) + ("/" if trailing and parts else "")


def join(uri: str, *parts: str) -> str:
    """Append path components to a URI or path (``..`` is resolved; leading ``/`` of parts ignored).

    ``join("s3://b/data", "images", "x.jpg") == "s3://b/data/images/x.jpg"``.
    """
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    parts = tuple(os.fspath(p) for p in parts)
    if scheme == "s3":
        bucket, key = _split_s3(uri)
        key = "/".join([key.strip("/")] + [p.strip("/") for p in parts if p.strip("/")])
        return f"s3://{bucket}/{_normalize_key(uri, key)}".rstrip("/") if key.strip("/") else f"s3://{bucket}"
    if scheme == "file":
        base = _local_path(uri)
        return "file://" + os.path.normpath(os.path.join(base, *[p.lstrip("/") for p in parts]))
    if not parts:
        return os.path.normpath(uri)
    return os.path.normpath(os.path.join(uri, *[p.lstrip("/" + os.sep) for p in parts]))


def normalize(uri: str) -> str:
    """Canonical form of a URI: absolute local path (``~`` expanded), ``file:///abs/path`` or
    ``s3://bucket/key`` without a trailing ``/`` and with ``.`` / ``..`` resolved."""
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    if scheme == "s3":
        return join(uri)
    if scheme == "file":
        return "file://" + _local_path(uri)
    return _local_path(uri)


def parent(uri: str) -> str:
    """The folder holding ``uri`` (``s3://b/a/x.csv`` -> ``s3://b/a``; a bucket is its own parent)."""
    uri = os.fspath(uri)
    scheme = _check_uri(uri)
    if scheme == "s3":
        bucket, key = _split_s3(uri)
        head = posixpath.dirname(key.rstrip("/"))
        return f"s3://{bucket}/{head}" if head else f"s3://{bucket}"
    if scheme == "file":
        return "file://" + os.path.dirname(_local_path(uri))
    return os.path.dirname(os.path.abspath(os.path.expanduser(uri)))


def basename(uri: str) -> str:
    """The last component of ``uri`` (file name)."""
    uri = os.fspath(uri)
    if is_s3(uri) or _scheme(uri) == "file":
        return posixpath.basename(uri.rstrip("/"))
    return os.path.basename(uri.rstrip(os.sep))


def resolve_relative(base_folder: str, path: str) -> str:
    """Interpret ``path`` (from a manifest or list file) relative to ``base_folder``.

    URIs with a scheme and absolute local paths are returned unchanged (absolute local paths
    next to an S3 manifest stay local); anything else is joined onto ``base_folder``.
    """
    path = os.fspath(path)
    scheme = _check_uri(path)
    if scheme is not None:
        return path
    if os.path.isabs(path) or path.startswith("~"):
        return os.path.abspath(os.path.expanduser(path)) if not is_s3(base_folder) else path
    return join(base_folder, path)
