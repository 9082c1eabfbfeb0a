"""Archive, large: one big object from a local HTTP source into moto's S3 server.

Baseline (the floor): boto3 `upload_file` of the same bytes from local disk to the same server.
Each side runs in its own child process, alternating, several rounds; we report medians of the
copy time, the ratio receiver/floor, and each child's peak RSS (ru_maxrss via wait4).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3

from tests.s3server import moto_server_process
from tests.sources import SourceServer, iter_content

MiB = 2**20


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float


def _child(args: list[str], env: dict[str, str]) -> Run:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._children", *args], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args[0]} failed ({proc.returncode})")
    return Run(float(out.decode().strip().splitlines()[-1]), usage.ru_maxrss / 1024)


def run(size_mib: int, rounds: int = 3) -> dict[str, object]:
    size = size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp, moto_server_process() as endpoint:
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
        source = Path(tmp) / "source.bin"
        with source.open("wb") as out:
            for chunk in iter_content("bench", 0, size):
                out.write(chunk)
        server = SourceServer()
        server.add("/bench.mp4", size, seed="bench", content_type="video/mp4")
        server.start()
        try:
            floor, ours = [], []
            for i in range(rounds):
                floor.append(_child(["boto3", str(source), bucket], env))
                workdir = Path(tmp) / f"r{i}"
                workdir.mkdir()
                ours.append(
                    _child(["receiver", server.url("/bench.mp4"), bucket, str(workdir)], env)
                )
        finally:
            server.stop()
    f = statistics.median(r.seconds for r in floor)
    o = statistics.median(r.seconds for r in ours)
    return {
        "size_mib": size_mib,
        "receiver_s": o,
        "floor_s": f,
        "ratio": o / f,
        "receiver_rss_mib": max(r.peak_rss_mib for r in ours),
        "floor_rss_mib": max(r.peak_rss_mib for r in floor),
    }
