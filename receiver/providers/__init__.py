"""The providers receiver knows, by name."""

from receiver.providers import apex, fliki, flora, vividflow
from receiver.providers.base import ProviderSpec

REGISTRY: dict[str, ProviderSpec] = {
    spec.name: spec for spec in (apex.SPEC, fliki.SPEC, flora.SPEC, vividflow.SPEC)
}

__all__ = ["REGISTRY", "ProviderSpec"]
