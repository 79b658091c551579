"""Capture rules shared by the device and the central side (docs/capture.md).

The rules are C++ (``csrc/common/url.h``), applied by the agent to every capture state it takes;
this module is their Python face, so ``edgesmith capture start|stop|upload`` refuse exactly the
receivers a device would refuse, before anything is signed.
"""

from __future__ import annotations

from edgesmith.runtime.artifact import _core

__all__ = ["url_https_or_loopback"]


def url_https_or_loopback(url: str) -> bool:
    """Whether a device may send its upload token to ``url``: https://, or http:// to the
    loopback (127.0.0.0/8, [::1], localhost), where the token never leaves the machine."""
    return bool(_core().url_https_or_loopback(url))
