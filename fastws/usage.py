"""Command-line usage errors: one line naming the option, then exit status 2.

Every fastws command (``fastws serve``, ``fastws index``, ``fastws publish``…) parses
its arguments with :class:`OneLineParser`, which raises :class:`UsageError` instead of
printing argparse's usage dump; the entry point prints ``fastws: <message>`` and
exits 2.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser", "UsageError"]


class UsageError(Exception):
    """A bad command line; the message is one line naming the option."""


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser that raises UsageError (one line) instead of printing a usage dump."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        if message.startswith("argument "):
            message = message[len("argument "):]
        if message.startswith("command: invalid choice"):
            message = message.replace("command: invalid choice:", "unknown command", 1)
        raise UsageError(message)
