"""Archive, large: one big object from a local HTTP source into an S3 server (SeaweedFS, moto).

Sides, each in a child process of its own, alternating, ``BENCH_ROUNDS`` rounds (default 3):

- receiver: ``Archiver.run_once`` on a queued job whose output link points at the file source
  (guarded streaming fetch, S3 multipart of type FULL_OBJECT with per-part CRC32, the whole
  object's CRC32 checked by the server on completion, then the SHA-256 as an object tag). The
  completion's and the tagging's own durations are reported beside the total.
- floor: boto3 ``upload_file`` of the same bytes from local disk to the same server.
- floor, same integrity: the same ``upload_file`` given the file's CRC32, which makes its
  multipart upload a ``FULL_OBJECT`` one, as receiver's is (on moto that completion is where the
  time goes: moto assembles the object once more to check it).
- rclone: ``rclone copyurl`` from the same source URL into the same server (on moto a versioned
  bucket: rclone's S3 backend needs versioning to work against moto), if rclone is installed.

The source serves the file from disk with ``sendfile`` (see ``_common.file_source``). Reported:
medians of the copy time (process start-up excluded for the Python sides; rclone is timed as a
whole process, its start-up is tens of milliseconds) and of the CPU time moto's server process
spent meanwhile (one Python process: on a small machine it, not the client, often sets the
pace), and each side's worst peak RSS. A child that only builds receiver's parts and pings S3
gives the RSS that the interpreter, the imports and the S3 client cost before any byte is copied.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench._common import (
    CHILD,
    S3,
    ChildResult,
    MiB,
    run_child,
    s3_server,
    workdir,
    write_random_file,
)
from bench._common import file_source as serve_files
from receiver import settings
from receiver.settings import PART_SIZE

#: receiver's defaults (settings.part_size, settings.parts_in_flight): the memory bound's terms.
PART_MIB, PARTS_IN_FLIGHT = PART_SIZE // MiB, settings.PARTS_IN_FLIGHT
#: The issue's bound on a copy's peak RSS growth: (parts in flight + 1) x part size + 16 MiB.
RSS_GROWTH_BOUND_MIB = (PARTS_IN_FLIGHT + 1) * PART_MIB + 16


@dataclass
class LargeResult:
    server: str
    size_mib: int
    receiver_s: float
    tag_s: float  # of receiver_s: PutObjectTagging (the SHA-256 tag)
    complete_s: float  # of receiver_s: CompleteMultipartUpload
    floor_s: float
    full_s: float  # boto3 upload_file with the whole object's CRC32 (FULL_OBJECT)
    rclone_s: float | None
    receiver_rss_mib: float
    floor_rss_mib: float
    rclone_rss_mib: float | None
    parts_rss_mib: float  # receiver's process before copying anything
    receiver_s3_cpu_s: float  # moto's CPU time during receiver's copy
    floor_s3_cpu_s: float
    rclone_s3_cpu_s: float | None
    # Medians of each round's own ratio (the sides of a round run back to back, so a slower
    # minute on a shared machine slows them alike): what the verdicts use.
    ratio_floor: float
    ratio_full: float
    ratio_rclone: float | None
    receiver_cpu_s: float  # the copying process's own CPU time (every thread)
    floor_cpu_s: float
    rclone_cpu_s: float | None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def _rclone_env(s3: S3) -> dict[str, str]:
    env = {k: v for k, v in s3.env.items() if not k.startswith("AWS_")}  # rclone reads AWS_*
    env.update(
        RCLONE_CONFIG_TARGET_TYPE="s3",
        RCLONE_CONFIG_TARGET_PROVIDER="Other",
        RCLONE_CONFIG_TARGET_ENDPOINT=s3.endpoint,
        RCLONE_CONFIG_TARGET_ACCESS_KEY_ID="bench",
        RCLONE_CONFIG_TARGET_SECRET_ACCESS_KEY="bench",
        RCLONE_CONFIG_TARGET_REGION="us-east-1",
        RCLONE_CONFIG="/dev/null",
    )
    return env


def run(size_mib: int, rounds: int, server: str) -> LargeResult:
    size = size_mib * MiB
    rclone = shutil.which("rclone")
    with workdir() as tmp, s3_server(server) as s3:
        source = tmp / "files" / "large.mp4"
        source.parent.mkdir()
        write_random_file(source, size)
        expected = _sha256(source)
        bucket, rclone_bucket = s3.bucket(), s3.bucket(versioned=server == "moto")
        parts = run_child([*CHILD, "parts", bucket, str(tmp)], s3.env)
        floor, full, ours, theirs = [], [], [], []
        cpu: dict[str, list[float]] = {"floor": [], "full": [], "receiver": [], "rclone": []}

        def measured(side: str, argv: list[str], env: dict[str, str]) -> ChildResult:
            before = s3.cpu_seconds()
            result = run_child(argv, env)
            cpu[side].append(s3.cpu_seconds() - before)
            return result

        with serve_files(source.parent) as base:
            url = f"{base}/{source.name}"
            for i in range(rounds):
                floor.append(measured("floor", [*CHILD, "boto3", str(source), bucket], s3.env))
                s3.empty(bucket)
                argv = [*CHILD, "boto3-full", str(source), bucket]
                full.append(measured("full", argv, s3.env))
                s3.empty(bucket)
                run_dir = tmp / f"round-{i}"
                run_dir.mkdir()
                argv = [*CHILD, "receiver", url, bucket, str(run_dir)]
                result = measured("receiver", argv, s3.env)
                if result.out["sha256"] != expected:
                    raise RuntimeError("receiver archived the wrong bytes")
                ours.append(result)
                s3.empty(bucket)
                if rclone is not None:
                    argv = [rclone, "copyurl", url, f"target:{rclone_bucket}/large.mp4"]
                    theirs.append(measured("rclone", argv, _rclone_env(s3)))
                    s3.empty(rclone_bucket)
    return LargeResult(
        server=server,
        size_mib=size_mib,
        receiver_s=statistics.median(r.out["seconds"] for r in ours),
        tag_s=statistics.median(r.out["tag_s"] for r in ours),
        complete_s=statistics.median(r.out["complete_s"] for r in ours),
        floor_s=statistics.median(r.out["seconds"] for r in floor),
        full_s=statistics.median(r.out["seconds"] for r in full),
        rclone_s=statistics.median(r.wall_s for r in theirs) if theirs else None,
        receiver_rss_mib=max(r.peak_rss_mib for r in ours),
        floor_rss_mib=max(r.peak_rss_mib for r in floor),
        rclone_rss_mib=max(r.peak_rss_mib for r in theirs) if theirs else None,
        parts_rss_mib=parts.peak_rss_mib,
        receiver_s3_cpu_s=statistics.median(cpu["receiver"]),
        floor_s3_cpu_s=statistics.median(cpu["floor"]),
        rclone_s3_cpu_s=statistics.median(cpu["rclone"]) if theirs else None,
        ratio_floor=_paired(ours, floor),
        ratio_full=_paired(ours, full),
        ratio_rclone=(
            statistics.median(
                o.out["seconds"] / t.wall_s for o, t in zip(ours, theirs, strict=True)
            )
            if theirs
            else None
        ),
        receiver_cpu_s=statistics.median(r.cpu_s for r in ours),
        floor_cpu_s=statistics.median(r.cpu_s for r in floor),
        rclone_cpu_s=statistics.median(r.cpu_s for r in theirs) if theirs else None,
    )


def _paired(ours: list[ChildResult], theirs: list[ChildResult]) -> float:
    """The median of the rounds' ratios of copy times."""
    return float(
        statistics.median(
            o.out["seconds"] / t.out["seconds"] for o, t in zip(ours, theirs, strict=True)
        )
    )


def sizes() -> list[int]:
    return [int(s) for s in os.environ.get("BENCH_SIZES_MIB", "256,1024").split(",") if s]
