"""Shared fixtures: an S3-compatible server (moto) on a loopback port, spoken to over real HTTP.

moto's in-process patching (``mock_aws``) is deliberately not used: pyarrow's S3 client is C++
and only a real HTTP server exercises the path production takes.
"""

from __future__ import annotations

import json
import urllib.request
import uuid

import pytest

FAKE_ACCESS_KEY = "testing"
FAKE_SECRET_KEY = "testing-secret-0f9e8d7c"
FAKE_REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server for the whole session."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """Fake credentials in the environment, isolated from the developer's AWS configuration."""
    for var in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", FAKE_REGION)
    monkeypatch.setenv("AWS_REGION", FAKE_REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return {"access_key": FAKE_ACCESS_KEY, "secret_key": FAKE_SECRET_KEY, "region": FAKE_REGION}


@pytest.fixture
def s3_client(s3_server, s3_env):
    """A boto3 S3 client for the moto server (for test set-up and checks)."""
    boto3 = pytest.importorskip("boto3")
    return boto3.client("s3", endpoint_url=s3_server, region_name=FAKE_REGION)


@pytest.fixture
def s3_bucket(s3_client):
    """Name of a fresh, empty bucket on the moto server."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


def set_moto_auth(endpoint: str, enabled: bool) -> None:
    """Switch moto's IAM authentication on (every request must be signed by a known key that is
    allowed the action) or off (the default), through its HTTP control API."""
    request = urllib.request.Request(
        endpoint + "/moto-api/reset-auth",
        data=b"0" if enabled else b"inf",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        json.loads(response.read())


@pytest.fixture
def s3_denied_credentials(s3_server, s3_env, s3_client, monkeypatch):
    """Switch the environment to credentials of an IAM user with no permissions, with moto's
    authentication on for the duration of the test. Yields the user's secret key."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server, region_name=FAKE_REGION)
    user = f"nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    set_moto_auth(s3_server, True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    try:
        yield key["SecretAccessKey"]
    finally:
        set_moto_auth(s3_server, False)


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory):
    """Where the tiny demo runs (``{root}/demo``): the suite's smoke run of its ``demo`` family has
    the same settings, so after ``tests/test_demo.py`` it resumes from these outputs instead of
    training again (run alone, it trains)."""
    return tmp_path_factory.mktemp("tiny-demo")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Local Ray; the fake AWS settings of ``conftest.s3_env`` are in the environment when Ray
    starts, so every Ray worker (decode tasks, train workers, the controller) inherits them."""
    fake_home = tmp_path_factory.mktemp("aws")
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": FAKE_REGION,
        "AWS_REGION": FAKE_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(fake_home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(fake_home / "credentials"),
        # The Train controller polls workers for reports every 2 s by default; polling faster
        # shortens every run (each fit waits for polls) and the worker-kill hook's delay.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        if ray.is_initialized():  # another module's cluster: start ours with these settings
            ray.shutdown()
        # address="local": a private Ray even when a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        try:
            yield
        finally:
            ray.shutdown()
