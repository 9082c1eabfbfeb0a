"""`make bench`: run every benchmark and print one table (ratios against same-run baselines)."""

from __future__ import annotations

import os
import platform

from bench import archive_large


def main() -> None:
    sizes = [int(s) for s in os.environ.get("BENCH_SIZES_MIB", "256,1024").split(",")]
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print()
    print("| benchmark | receiver | baseline | ratio | receiver peak RSS | baseline peak RSS |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        r = archive_large.run(size)
        print(
            f"| archive {r['size_mib']} MiB, HTTP -> moto S3 | {r['receiver_s']:.2f} s | "
            f"{r['floor_s']:.2f} s (boto3 upload_file) | {r['ratio']:.2f}x | "
            f"{r['receiver_rss_mib']:.0f} MiB | {r['floor_rss_mib']:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
