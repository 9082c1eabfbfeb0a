"""`make bench`: run every benchmark and print one table (ratios against same-run baselines).

Knobs (environment): ``BENCH_ONLY`` (comma-separated subset of ingest, large, many, deadlines,
threshold, onward), ``BENCH_ONWARD_JOBS`` (1000),
``BENCH_SIZES_MIB`` (256,1024), ``BENCH_ROUNDS`` (3, archive-large rounds per size; ratios
are medians of each round's own ratio),
``BENCH_INGEST_SECONDS`` (10), ``BENCH_CONNECTIONS`` (32), ``BENCH_MANY_COUNT`` (1000),
``BENCH_MANY_ROUNDS`` (3),
``BENCH_S3`` (seaweedfs,moto: the S3 servers of the archive benchmarks),
``BENCH_TMPDIR`` (where files and databases go; the system temporary directory by default).
Timings are never pass/fail anywhere: the verdict column compares with the issue's targets.
"""

from __future__ import annotations

import os
import shutil
import time

from bench import archive_large, archive_many, deadlines, ingest, onward, put_threshold
from bench._common import machine, s3_servers

ALL = ("ingest", "large", "many", "deadlines", "threshold", "onward")


def ratio(ours: float, baseline: float) -> str:
    return f"{ours / baseline:.2f}x" if baseline else "—"


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def _others(load: ingest.Load) -> str:
    return "".join(f" (+{n} x HTTP {code})" for code, n in sorted(load.unexpected.items()))


def ingest_rows() -> None:
    r = ingest.run()
    conns = ingest.CONNECTIONS
    for name, ours, bare, status in (
        ("accepted", r.receiver, r.bare, 202),
        ("duplicate redelivery", r.receiver_duplicate, r.bare_duplicate, 200),
    ):
        target = "≥ 0.70x" if status == 202 else "—"
        row(
            f"ingest, {name}: {status}s per second ({conns} connections)",
            f"{ours.rate:,.0f}/s{_others(ours)}",
            f"{bare.rate:,.0f}/s bare Starlette{_others(bare)}",
            ratio(ours.rate, bare.rate),
            target,
            verdict(ours.rate >= 0.7 * bare.rate) if status == 202 else "—",
        )
        row(
            f"ingest, {name}: ack latency p50 / p99",
            f"{ours.p50_ms:.1f} / {ours.p99_ms:.1f} ms",
            f"{bare.p50_ms:.1f} / {bare.p99_ms:.1f} ms",
            f"{ratio(ours.p50_ms, bare.p50_ms)} / {ratio(ours.p99_ms, bare.p99_ms)}",
            "p99 < 25 ms",
            verdict(ours.p99_ms < 25),
        )


def large_rows() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    for server in s3_servers():
        for size in archive_large.sizes():
            large_server_rows(archive_large.run(size, rounds, server))


def large_server_rows(r: archive_large.LargeResult) -> None:
    label = f"archive {r.size_mib} MiB, HTTP → {r.server} S3"
    row(
        f"{label}: copy time",
        f"{r.receiver_s:.2f} s, of which CompleteMultipartUpload {r.complete_s:.2f} s, "
        f"PutObjectTagging {r.tag_s:.2f} s",
        f"{r.floor_s:.2f} s boto3 upload_file from disk",
        f"{r.ratio_floor:.2f}x",
        "≤ 1.15x",
        verdict(r.ratio_floor <= 1.15),
    )
    row(
        f"{label}: copy time vs the same integrity",
        f"{r.receiver_s:.2f} s",
        f"{r.full_s:.2f} s boto3 upload_file given the file's CRC32 (FULL_OBJECT)",
        f"{r.ratio_full:.2f}x",
        "—",
        "—",
    )
    if r.rclone_s is None:
        row(f"{label}: vs rclone", "—", "rclone not installed", "—", "< 1.00x", "not run")
    else:
        row(
            f"{label}: vs rclone",
            f"{r.receiver_s:.2f} s",
            f"{r.rclone_s:.2f} s rclone copyurl",
            f"{r.ratio_rclone:.2f}x",
            "< 1.00x",
            verdict(r.ratio_rclone is not None and r.ratio_rclone < 1.0),
        )
    rclone_rss = "" if r.rclone_rss_mib is None else f", rclone {r.rclone_rss_mib:.0f} MiB"
    row(
        f"{label}: peak RSS",
        f"{r.receiver_rss_mib:.0f} MiB (before copying: {r.parts_rss_mib:.0f} MiB)",
        f"boto3 {r.floor_rss_mib:.0f} MiB{rclone_rss}",
        ratio(r.receiver_rss_mib, r.floor_rss_mib),
        "—",
        "—",
    )
    growth = r.receiver_rss_mib - r.parts_rss_mib
    bound = archive_large.RSS_GROWTH_BOUND_MIB
    row(
        f"{label}: peak RSS growth of the copy",
        f"{growth:.0f} MiB",
        f"bound ({archive_large.PARTS_IN_FLIGHT} + 1) x {archive_large.PART_MIB} MiB + 16 MiB "
        f"= {bound} MiB",
        ratio(growth, bound),
        "≤ 1.00x",
        verdict(growth <= bound),
    )
    cpu_row(f"{label}: the copying process's CPU", r.receiver_cpu_s, r.floor_cpu_s, r.rclone_cpu_s)
    cpu_row(
        f"{label}: {r.server} server CPU during the copy",
        r.receiver_s3_cpu_s,
        r.floor_s3_cpu_s,
        r.rclone_s3_cpu_s,
    )


def cpu_row(name: str, ours: float, boto3: float, rclone: float | None) -> None:
    """A "where the time goes" row: CPU seconds of receiver's side against boto3's and rclone's."""
    theirs = "" if rclone is None else f", rclone {rclone:.2f} s"
    row(
        name,
        f"{ours:.2f} s",
        f"boto3 {boto3:.2f} s{theirs}",
        ratio(ours, boto3),
        "(where time goes)",
        "—",
    )


def many_rows() -> None:
    for server in s3_servers():
        r = archive_many.run(server)
        m = r.median
        row(
            f"archive {r.count:,} x 1 MiB → {r.server} S3, callback → archived "
            f"({r.workers} workers; median of {len(r.rounds)} rounds)",
            f"{m('receiver_s'):.2f} s (CPU: receiver {m('receiver_cpu_s'):.1f} s, server "
            f"{m('receiver_s3_cpu_s'):.1f} s, source and callbacks {m('bench_cpu_s'):.1f} s; "
            f"{m('source_connections'):,.0f} source connections; a copy (fetch, store, mark) "
            f"{m('copy_s') / r.count * 1000:.0f} ms, copy slots busy "
            f"{m('copy_s') / (r.workers * m('receiver_s')):.0%} of the time)",
            f"{m('floor_s'):.2f} s boto3, {r.workers} threads, from disk (CPU: boto3 "
            f"{m('floor_cpu_s'):.1f} s, server {m('floor_s3_cpu_s'):.1f} s; "
            f"{m('floor_s') * r.workers / r.count * 1000:.0f} ms an upload)",
            f"{r.ratio:.2f}x",
            "≤ 1.30x",
            verdict(r.ratio <= 1.3),
        )


def threshold_rows() -> None:
    for server in s3_servers():
        for r in put_threshold.run(server):
            row(
                f"put {r.size_mib} MiB → {r.server} S3: 8 MiB parts vs one PUT (single-PUT "
                "threshold)",
                f"{r.multipart_s * 1000:.0f} ms multipart",
                f"{r.single_put_s * 1000:.0f} ms one PUT of the same parts",
                ratio(r.multipart_s, r.single_put_s),
                "(decision)",
                "—",
            )


def deadline_rows() -> None:
    r = deadlines.run()
    row(
        f"deadline misses, {r.jobs}-job backlog, {r.workers} workers (simulated time)",
        f"{r.receiver_misses} (earliest deadline first)",
        f"{r.fifo_misses} first-in-first-out",
        ratio(r.receiver_misses, r.fifo_misses),
        "fewer than FIFO",
        verdict(r.receiver_misses < r.fifo_misses),
    )


def onward_rows() -> None:
    r = onward.run()
    lat = r.latency
    row(
        f"onward: archived → delivered to a local application, {lat.jobs:,} jobs, p50 / p99",
        f"{lat.p50_s * 1000:,.0f} / {lat.p99_s * 1000:,.0f} ms (max {lat.max_s * 1000:,.0f} ms; "
        f"all {2 * lat.jobs:,} events in {lat.total_s:.1f} s after the first webhook)",
        "—",
        "—",
        "p99 < 5 s",
        verdict(lat.p99_s < 5),
    )
    row(
        f"onward: ingest with delivery on vs off, job.failed per request ({onward.CONNECTIONS} "
        "connections)",
        f"{r.on.rate:,.0f}/s, p99 {r.on.p99_ms:.1f} ms ({r.on.delivered:,} events delivered "
        "meanwhile)",
        f"{r.off.rate:,.0f}/s, p99 {r.off.p99_ms:.1f} ms without an endpoint",
        f"{ratio(r.on.rate, r.off.rate)} / {ratio(r.on.p99_ms, r.off.p99_ms)}",
        "≥ 0.90x",
        verdict(r.on.rate >= 0.9 * r.off.rate),
    )


def main() -> None:
    only = [name for name in os.environ.get("BENCH_ONLY", ",".join(ALL)).split(",") if name]
    unknown = set(only) - set(ALL)
    if unknown:
        raise SystemExit(f"BENCH_ONLY: unknown benchmark(s) {sorted(unknown)}; known: {ALL}")
    started = time.monotonic()
    print(f"machine: {machine()}")
    rclone = shutil.which("rclone")
    print(f"rclone: {rclone or 'not installed (its baseline is skipped)'}")
    print()
    row("benchmark", "receiver", "baseline (same run)", "ratio", "target", "verdict")
    row(*["---"] * 6)
    runners = {
        "ingest": ingest_rows,
        "large": large_rows,
        "many": many_rows,
        "deadlines": deadline_rows,
        "threshold": threshold_rows,
        "onward": onward_rows,
    }
    for name in only:
        runners[name]()
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
