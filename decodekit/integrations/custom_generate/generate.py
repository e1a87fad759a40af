"""The Hub's ``custom_generate`` layout of :mod:`decodekit.integrations.transformers`."""

from decodekit.integrations.transformers import hub_generate as generate

__all__ = ["generate"]
