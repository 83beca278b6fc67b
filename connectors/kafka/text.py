"""Cutting long text (errors, dead letters, log lines, samples): one convention everywhere.

A cut text keeps its start and ends in "… (N characters)", N being the whole text's length,
so a reader sees at once that it was cut and by how much.
"""

from __future__ import annotations

__all__ = ["shorten"]


def shorten(text: str, limit: int) -> str:
    """`text` itself when it has at most `limit` characters; else its start and "… (N characters)",
    `limit` characters in all."""
    if len(text) <= limit:
        return text
    suffix = f"… ({len(text)} characters)"
    return text[: max(0, limit - len(suffix))] + suffix
