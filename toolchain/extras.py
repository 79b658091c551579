"""Which of edgesmith's extras installs a package, so a missing one is one sentence, not a traceback.

A wheel installed without extras (the device runtime only) still has the whole ``edgesmith``
command; a command that imports a package of the ``toolchain`` extra then fails with
``ModuleNotFoundError``. The CLI's one entry (``edgesmith.toolchain.cli.run``) asks
:func:`missing_package_message` for the sentence naming the extra.

The extras' lists are pyproject.toml's ``[project.optional-dependencies]``, read from the installed
distribution's metadata (``Requires-Dist: onnx==1.23.2; extra == "toolchain"``), so they cannot
drift from pyproject. Only where a distribution's import name differs from its normalised name does
``IMPORT_NAMES`` say it (tests/test_extras.py checks every requirement against the installed ones).
"""

from __future__ import annotations

import re

DISTRIBUTION = "edgesmith"

# distribution (normalised) → top-level import name, where they differ beyond '-' → '_'
IMPORT_NAMES: dict[str, str] = {
    "apache-tvm": "tvm",
    "apache-tvm-ffi": "tvm_ffi",
    "xgboost-cpu": "xgboost",
    "paho-mqtt": "paho",
    "scikit-learn": "sklearn",
    "pillow": "PIL",
}

# When several extras list a package, the one to suggest: the CLI is the central toolchain's.
# The test extra is never suggested (no command imports test tools).
PREFERENCE = ("toolchain", "runtime", "postgres")

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)[^;]*;(.*)$")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def import_name(distribution: str) -> str:
    name = normalise(distribution)
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def extras_requirements() -> dict[str, list[str]]:
    """Extra → the distributions it installs, from edgesmith's installed metadata ({} when edgesmith
    is not installed as a distribution)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        lines = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        return {}
    extras: dict[str, list[str]] = {}
    for line in lines:
        match = _REQUIREMENT.match(line)
        extra = _EXTRA.search(match.group(2)) if match else None
        if extra:
            extras.setdefault(extra.group(1), []).append(normalise(match.group(1)))
    return extras


def extra_for(module: str) -> tuple[str, str] | None:
    """(distribution, extra) that installs the top-level module ``module``, or None."""
    extras = extras_requirements()
    for extra in [e for e in PREFERENCE if e in extras]:
        for distribution in extras[extra]:
            if import_name(distribution) == module:
                return distribution, extra
    return None


def missing_package_message(error: ModuleNotFoundError) -> str | None:
    """The sentence for a package an extra installs and this environment lacks; None when the
    missing module is not one (then it is a bug, and its traceback should be seen)."""
    module = (error.name or "").split(".")[0]
    found = extra_for(module) if module else None
    if found is None:
        return None
    distribution, extra = found
    return (f"this command needs {distribution} (module {module!r} is not installed), which comes with "
            f"edgesmith's {extra} extra: pip install 'edgesmith[{extra}]'")
