"""The one error type users see from `sweep` for bad input (the CLI prints its one line and exits 2)."""
from __future__ import annotations


class SweepError(ValueError):
    """Bad sweep input; the message is one line meant for the user."""
