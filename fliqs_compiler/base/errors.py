"""User-facing errors: the CLI prints ``str(error)`` as one line and exits with ``exit_code``."""
from __future__ import annotations


class FliqsError(Exception):
    """Bad input from the user (file, node, option, data). Exit code 2, one line, no traceback.

    The message names the thing that is wrong and says what to do about it.
    """

    exit_code = 2


class CheckFailed(FliqsError):
    """A check the user asked for failed (e.g. ``inspect --verify`` disagreement). Exit code 1."""

    exit_code = 1


def one_line(error: BaseException, limit: int = 300, strip_prefix: str = "") -> str:
    """The first line of ``error``'s message (its type name when empty), at most ``limit``
    characters, without ``strip_prefix`` — for quoting a library's error inside ours."""
    text = str(error).strip()
    text = text.splitlines()[0] if text else type(error).__name__
    if strip_prefix and text.startswith(strip_prefix):
        text = text[len(strip_prefix):]
    return text[:limit]
