"""The one error type users see from `trainable` before a trial starts training."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line meant for the user (CLI: exit 2)."""
