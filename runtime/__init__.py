"""edgesmith.runtime: everything that runs on a device (artifact checks, sessions, telemetry)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Session", "TensorInfo"]

if TYPE_CHECKING:
    from edgesmith.runtime.session import Session, TensorInfo


def __getattr__(name: str) -> Any:
    # Imported lazily so `import edgesmith.runtime.<module>` never needs numpy or the C++ core.
    if name in __all__:
        from edgesmith.runtime import session

        return getattr(session, name)
    raise AttributeError(f"module 'edgesmith.runtime' has no attribute {name!r}")
