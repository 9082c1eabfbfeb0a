"""FLORA: no webhooks ("async polling only"); ImageKit outputs, "long-lived but not permanent"."""

from __future__ import annotations

from datetime import timedelta

from receiver.providers.base import ProviderSpec

NAME = "flora"

SPEC = ProviderSpec(
    name=NAME,
    # Undocumented lifetime: we assume a week from completion and archive as soon as we can.
    window=timedelta(days=7),
    download_hosts=("ik.imagekit.io", "media.flora.ai"),
    default_base_url="https://app.flora.ai",
    parse_webhook=None,
)
