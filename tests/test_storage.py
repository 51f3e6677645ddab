import os
import pickle
import time

import pyarrow.fs as pafs
import pytest

from irnet_ray.data.storage import (
    StorageAccessDenied,
    StorageError,
    StorageNotFound,
    StorageOptions,
    StorageUnreachable,
    basename,
    exists,
    join,
    list_files,
    normalize,
    parent,
    read_bytes,
    resolve,
    resolve_relative,
    write_bytes,
)

# --------------------------------------------------------------------------------------
# no I/O


def test_resolve_local_and_file_uri(tmp_path, monkeypatch):
    fs, path = resolve(str(tmp_path / "a.txt"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.txt")
    fs, path = resolve(f"file://{tmp_path}/x/../a.txt")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.txt")
    monkeypatch.chdir(tmp_path)
    assert resolve("rel/b.txt")[1] == str(tmp_path / "rel" / "b.txt")


def test_resolve_s3_uses_endpoint_option_and_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    options = StorageOptions(endpoint_url="http://127.0.0.1:9000", region="eu-west-1")
    fs, path = resolve("s3://bucket/some/key.jpg", options)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/key.jpg"
    assert fs.region == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9000")
    assert StorageOptions().effective_endpoint() == "https://minio.example:9000"
    assert StorageOptions(endpoint_url="http://a:1").effective_endpoint() == "http://a:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert StorageOptions().effective_endpoint() == "http://10.0.0.1:1"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/x.jpg", "hdfs://nn/x", "az://c/x"])
def test_unsupported_scheme_names_supported_ones(uri):
    with pytest.raises(ValueError, match=r"s3://") as info:
        resolve(uri)
    assert uri.split(":")[0] in str(info.value)
    with pytest.raises(ValueError):
        read_bytes(uri)


def test_malformed_uris_and_endpoints():
    with pytest.raises(ValueError, match="s3://bucket/key"):
        resolve("s3:/bucket/key")
    with pytest.raises(ValueError, match="no bucket"):
        resolve("s3:///key")
    with pytest.raises(ValueError, match="http://host:port"):
        StorageOptions(endpoint_url="localhost:9000")
    with pytest.raises(ValueError, match="credentials"):
        StorageOptions(endpoint_url="http://user:pw@localhost:9000")


def test_options_hold_no_secrets_and_pickle():
    options = StorageOptions(endpoint_url="http://127.0.0.1:9000", region="us-east-1")
    text = repr(options)
    assert "secret" not in text.lower() and "key" not in text.lower()
    assert pickle.loads(pickle.dumps(options)) == options


def test_join_parent_basename_normalize(tmp_path):
    assert join("s3://b/data/", "images", "/x.jpg") == "s3://b/data/images/x.jpg"
    assert join("s3://b/data/manifests", "../images/x.jpg") == "s3://b/data/images/x.jpg"
    assert join("s3://b") == "s3://b"
    with pytest.raises(ValueError, match="above the bucket"):
        join("s3://b/a", "../../x")
    assert join(str(tmp_path), "a", "b.png") == str(tmp_path / "a" / "b.png")
    assert join(f"file://{tmp_path}", "a") == f"file://{tmp_path}/a"
    assert parent("s3://b/a/m.csv") == "s3://b/a" and parent("s3://b/m.csv") == "s3://b"
    assert parent(str(tmp_path / "m.csv")) == str(tmp_path)
    assert basename("s3://b/a/m.csv") == "m.csv"
    assert normalize("s3://b/a/./c/") == "s3://b/a/c"
    assert resolve_relative("s3://b/a", "img/x.jpg") == "s3://b/a/img/x.jpg"
    assert resolve_relative("s3://b/a", "s3://other/x.jpg") == "s3://other/x.jpg"
    assert resolve_relative(str(tmp_path), "/abs/x.jpg") == "/abs/x.jpg"


# --------------------------------------------------------------------------------------
# local


def test_local_round_trip_is_atomic_and_lists(tmp_path):
    root = tmp_path / "store"
    write_bytes(str(root / "a" / "one.JPG"), b"1")
    write_bytes(str(root / "a" / "b" / "two.png"), b"22")
    write_bytes(str(root / "notes.txt"), b"x")
    write_bytes(str(root / "notes.txt"), b"replaced")
    assert read_bytes(str(root / "notes.txt")) == b"replaced"
    assert exists(str(root / "a")) and not exists(str(root / "missing"))
    assert sorted(os.listdir(root)) == ["a", "notes.txt"]  # no temporary files left behind
    assert list_files(str(root)) == sorted(
        [str(root / "a" / "one.JPG"), str(root / "a" / "b" / "two.png"), str(root / "notes.txt")]
    )
    assert list_files(str(root), suffixes=(".jpg", ".png")) == sorted(
        [str(root / "a" / "one.JPG"), str(root / "a" / "b" / "two.png")]
    )
    assert list_files(f"file://{root}/a", suffixes=[".png"]) == [f"file://{root}/a/b/two.png"]
    assert list_files(str(root / "notes.txt")) == [str(root / "notes.txt")]


def test_local_errors(tmp_path):
    with pytest.raises(StorageNotFound, match="no such file") as info:
        read_bytes(str(tmp_path / "nope.jpg"))
    assert isinstance(info.value, FileNotFoundError) and info.value.uri == str(tmp_path / "nope.jpg")
    with pytest.raises(StorageNotFound):
        list_files(str(tmp_path / "nope"))
    with pytest.raises(StorageError, match="folder"):
        read_bytes(str(tmp_path))
    err = pickle.loads(pickle.dumps(info.value))
    assert type(err) is StorageNotFound and str(err) == str(info.value) and err.uri == info.value.uri


# --------------------------------------------------------------------------------------
# S3 over HTTP (moto server)


@pytest.mark.timeout(60)
def test_s3_round_trip(s3_server, s3_bucket, s3_client):
    options = StorageOptions(endpoint_url=s3_server)
    base = f"s3://{s3_bucket}/data"
    write_bytes(f"{base}/images/a.jpg", b"jpeg-bytes", options)
    write_bytes(f"{base}/images/sub/b.PNG", b"png-bytes", options)
    write_bytes(f"{base}/manifest.csv", b"image,classes\n", options)
    assert s3_client.get_object(Bucket=s3_bucket, Key="data/images/a.jpg")["Body"].read() == b"jpeg-bytes"
    assert read_bytes(f"{base}/images/sub/b.PNG", options) == b"png-bytes"
    assert exists(f"{base}/images/a.jpg", options)
    assert exists(f"{base}/images", options)  # a prefix with objects under it
    assert exists(f"s3://{s3_bucket}", options)
    assert not exists(f"{base}/images/zzz.jpg", options)
    assert list_files(base, options) == [
        f"{base}/images/a.jpg",
        f"{base}/images/sub/b.PNG",
        f"{base}/manifest.csv",
    ]
    assert list_files(base, options, suffixes=(".png",)) == [f"{base}/images/sub/b.PNG"]
    assert list_files(f"{base}/images/a.jpg", options) == [f"{base}/images/a.jpg"]
    write_bytes(f"{base}/images/a.jpg", b"new", options)  # overwrite
    assert read_bytes(f"{base}/images/a.jpg", options) == b"new"


@pytest.mark.timeout(60)
def test_s3_endpoint_from_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    write_bytes(f"s3://{s3_bucket}/env.txt", b"via env")
    assert read_bytes(f"s3://{s3_bucket}/env.txt") == b"via env"


@pytest.mark.timeout(60)
def test_s3_small_write_is_one_put(s3_server, s3_bucket, s3_client):
    # A multipart upload would leave no trace once completed, so check the object's ETag: a single
    # PUT gives the MD5 of the content, a multipart upload gives "<md5 of md5s>-<parts>".
    import hashlib

    write_bytes(f"s3://{s3_bucket}/one.bin", b"x" * 1000, StorageOptions(endpoint_url=s3_server))
    etag = s3_client.head_object(Bucket=s3_bucket, Key="one.bin")["ETag"].strip('"')
    assert etag == hashlib.md5(b"x" * 1000).hexdigest()


@pytest.mark.timeout(60)
def test_s3_not_found(s3_server, s3_bucket):
    options = StorageOptions(endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/missing/key.jpg"
    with pytest.raises(StorageNotFound, match="no such file or bucket: s3://") as info:
        read_bytes(uri, options)
    assert uri in str(info.value)
    with pytest.raises(StorageNotFound, match="no-such-bucket-xyz"):
        read_bytes("s3://no-such-bucket-xyz/key.jpg", options)
    with pytest.raises(StorageNotFound):
        list_files(f"s3://{s3_bucket}/nothing-here", options)
    with pytest.raises(StorageNotFound, match="does not exist"):
        write_bytes("s3://no-such-bucket-xyz/key.jpg", b"1", options)
    assert not exists("s3://no-such-bucket-xyz/key.jpg", options)


@pytest.mark.timeout(60)
def test_s3_unreachable_fails_fast(s3_env):
    options = StorageOptions(endpoint_url="http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(StorageUnreachable) as info:
        read_bytes("s3://bucket/key.jpg", options)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert message.startswith("cannot reach the object store at http://127.0.0.1:9")
    assert s3_env["secret_key"] not in message
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(StorageUnreachable):
        exists("s3://bucket/key.jpg", options)
    with pytest.raises(StorageUnreachable):
        write_bytes("s3://bucket/key.jpg", b"1", options)
    with pytest.raises(StorageUnreachable):
        list_files("s3://bucket/prefix", options)
    assert time.monotonic() - start < 40


@pytest.mark.timeout(60)
def test_s3_access_denied_never_shows_the_secret(s3_server, s3_bucket, s3_client, s3_denied_credentials):
    secret = s3_denied_credentials
    options = StorageOptions(endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/private.jpg"
    errors = []
    for op in (
        lambda: read_bytes(uri, options),
        lambda: write_bytes(uri, b"1", options),
        lambda: list_files(f"s3://{s3_bucket}", options),
        lambda: exists(uri, options),
    ):
        with pytest.raises(StorageAccessDenied) as info:
            op()
        errors.append(info.value)
    for err in errors:
        text = str(err)
        assert text.startswith(f"access denied to s3://{s3_bucket}")
        assert "check credentials" in text
        assert secret not in text and secret not in repr(err)
        assert isinstance(err, PermissionError)


@pytest.mark.timeout(60)
def test_s3_anonymous_option(s3_server, s3_bucket, s3_client):
    s3_client.put_object(Bucket=s3_bucket, Key="public.txt", Body=b"hello", ACL="public-read")
    s3_client.put_object(Bucket=s3_bucket, Key="private.txt", Body=b"secret")
    options = StorageOptions(endpoint_url=s3_server, anonymous=True)
    assert read_bytes(f"s3://{s3_bucket}/public.txt", options) == b"hello"
    with pytest.raises(StorageAccessDenied, match="anonymous access is not allowed"):
        read_bytes(f"s3://{s3_bucket}/private.txt", options)


# --------------------------------------------------------------------------------------
# create_exclusive: the commit log's and the lease's "create only if absent"


def test_create_exclusive_local(tmp_path):
    from irnet_ray.data.storage import create_exclusive

    target = str(tmp_path / "log" / "00000000.json")
    assert create_exclusive(target, b"first") is True
    assert create_exclusive(target, b"second") is False
    assert read_bytes(target) == b"first"
    assert sorted(os.listdir(tmp_path / "log")) == ["00000000.json"]  # no temporary files left behind
    assert create_exclusive(f"file://{tmp_path}/log/00000001.json", b"other") is True


@pytest.mark.timeout(60)
def test_create_exclusive_s3_over_http(s3_server, s3_bucket, s3_client):
    from irnet_ray.data.storage import create_exclusive

    options = StorageOptions(endpoint_url=s3_server)
    target = f"s3://{s3_bucket}/log/00000000.json"
    assert create_exclusive(target, b"first", options) is True
    assert create_exclusive(target, b"second", options) is False
    assert s3_client.get_object(Bucket=s3_bucket, Key="log/00000000.json")["Body"].read() == b"first"
    with pytest.raises(StorageNotFound):
        create_exclusive(f"s3://no-such-bucket-{s3_bucket}/x.json", b"x", options)


@pytest.mark.timeout(60)
def test_create_exclusive_s3_errors_are_storage_errors(s3_server, s3_bucket, s3_denied_credentials):
    from irnet_ray.data.storage import create_exclusive

    with pytest.raises(StorageAccessDenied) as info:
        create_exclusive(f"s3://{s3_bucket}/x.json", b"x", StorageOptions(endpoint_url=s3_server))
    assert s3_denied_credentials not in str(info.value)
    with pytest.raises(StorageUnreachable):
        create_exclusive("s3://bucket/x.json", b"x",
                         StorageOptions(endpoint_url="http://127.0.0.1:9", connect_timeout=0.5, max_attempts=1))
