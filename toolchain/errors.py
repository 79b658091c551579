"""Errors of the central toolchain.

``UserError`` is a problem with what the user asked for (a file, a flag, a model): the CLI prints
its message as one sentence and exits non-zero, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


class BackendUnavailable(UserError):
    """A backend's compiler or libraries are missing on this machine."""


class CompileError(UserError):
    """A backend could not compile the model (e.g. an operator it does not support)."""


class ValidationError(UserError):
    """The compiled artifact's outputs are not within tolerance of the reference."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (compilers' messages run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
