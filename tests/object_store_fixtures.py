"""An S3-compatible server on 127.0.0.1 for tests: moto's standalone server, spoken to over the real S3 protocol.

Everything that talks S3 (pyarrow.fs, Ray Data, Ray Train storage, MLflow's
artifact store through boto3) finds it through the standard AWS environment
variables, exactly as it would find a real bucket; nothing is mocked in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow_fixtures import free_port, stop_process_group


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]  # what a process needs to reach the bucket

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


def _moto_cli() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]


@contextmanager
def run_s3_server(workdir: Path, timeout_s: float = 60.0) -> Iterator[S3Server]:
    """Start moto on a free loopback port, create a bucket, yield it; the server is always stopped."""
    port = free_port()
    bucket = f"mfcon-test-{port}"
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "mfcon-test-key", "AWS_SECRET_ACCESS_KEY": "mfcon-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}
    log = workdir / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_moto_cli(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
                with urllib.request.urlopen(req, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server not up after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
        yield S3Server(endpoint=endpoint, bucket=bucket, env=env)
    finally:
        stop_process_group(proc)
