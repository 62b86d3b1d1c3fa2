"""Checks of user input that several stages share, each failing with a message that names
the value, what was wrong and what is valid."""

from __future__ import annotations


def check_positive_int(name: str, value) -> int:
    """`value` if it is a positive int (not a bool); else ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
