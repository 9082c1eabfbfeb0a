"""Vivid Flow: a status endpoint only; videos are Google Cloud Storage links."""

from __future__ import annotations

from receiver.providers.base import ProviderSpec

NAME = "vividflow"

SPEC = ProviderSpec(
    name=NAME,
    # Undocumented lifetime: the GCS signed URL's own X-Goog-Expires applies when present.
    window=None,
    download_hosts=("storage.googleapis.com", "*.storage.googleapis.com"),
    # The documented base URL is a placeholder ("your-app-domain.com"): operators must set it.
    default_base_url="https://your-app-domain.com/api/v1",
    parse_webhook=None,
)
