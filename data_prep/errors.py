"""Errors that carry one clear line for the user (the CLI prints it and exits 2)."""
from __future__ import annotations


class DataPrepError(Exception):
    """Bad user input: a missing or unreadable corpus, an impossible setting, an existing output."""


class DatasetError(DataPrepError):
    """A prepared dataset that is missing, incomplete, corrupted or from a newer data_prep."""
