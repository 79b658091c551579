"""Typed errors of the edgesmith runtime.

Every error the C++ core raises is mapped, in one place (``csrc/python/errors.cc``), to one of
these classes. Each message is one sentence that names the problem and what to do about it.
``RuntimeError`` and ``ValueError`` deliberately shadow the builtins inside this module, and
subclass them, so ``except ValueError`` in user code still catches an input mismatch.
"""

from __future__ import annotations

import builtins


class Error(Exception):
    """Base class of every error edgesmith raises on purpose."""


class RuntimeError(Error, builtins.RuntimeError):  # noqa: A001 - intentional, see module doc
    """Something failed while doing valid work (I/O, a backend library, the device)."""


class ValueError(Error, builtins.ValueError):  # noqa: A001 - intentional, see module doc
    """The caller handed over something invalid (an artifact, a manifest, an input)."""


class IntegrityError(ValueError):
    """An artifact is not exactly what its signed manifest describes.

    ``path`` is the artifact-relative file that failed the check (``manifest.json``,
    ``manifest.sig`` or a payload file), or ``None`` when no single file is to blame.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class ManifestError(ValueError):
    """A manifest is readable but does not follow the artifact schema."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class InputError(ValueError):
    """Inputs handed to a Session do not match the model's (count, names, dtype or shape)."""


class UnsupportedArtifactError(ValueError):
    """The artifact is valid but cannot run here (another ISA, a format this runtime does not run).

    ``path`` is the artifact-relative file to blame (e.g. ``model.so``), or ``None``.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class BackendError(RuntimeError):
    """A backend plugin or its engine failed to load the payload or to run it."""
