"""The one exception type a user may see as a message rather than a traceback.

Every package raises a subclass of `VlmixerError` for bad input, bad
configuration or a damaged store; the CLI prints its message and exits 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class VlmixerError(Exception):
    """A user-facing error: the message names the input and what is wrong."""


class ConfigError(VlmixerError):
    """A config file or override is invalid (unknown key, bad type, bad value)."""


class StoreError(VlmixerError):
    """A store cannot be opened or read: missing, wrong format version, corrupted."""
