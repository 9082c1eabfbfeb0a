"""A fake instance of every provider on localhost (`server`), and the demo that runs receiver
against it (`demo`). A tool beside the product: reached by `receiver simulate`, `make demo`, the
tests and the benchmarks; receiver itself never imports it.
"""

from receiver.simulator.demo import DEMO_CASES, FINAL, DemoCase, demo_settings, run_demo
from receiver.simulator.server import (
    BLOCK,
    PROVIDERS,
    Faults,
    ServerThread,
    Simulator,
    content_sha256,
    iter_content,
)

__all__ = [
    "BLOCK",
    "DEMO_CASES",
    "FINAL",
    "PROVIDERS",
    "DemoCase",
    "Faults",
    "ServerThread",
    "Simulator",
    "content_sha256",
    "demo_settings",
    "iter_content",
    "run_demo",
]
