"""Logging set-up shared by every layer: one logger tree under "swarmlm", to stderr.

Imports nothing from swarmlm.
"""

import logging
import os

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the "swarmlm" tree; `name` is usually `__name__`."""
    if not name.startswith("swarmlm"):
        name = f"swarmlm.{name}"
    return logging.getLogger(name)


def configure(level: str | None = None) -> None:
    """Send swarmlm's logs to stderr at `level` (default: $SWARMLM_LOG or WARNING)."""
    global _CONFIGURED
    level = (level or os.environ.get("SWARMLM_LOG") or "WARNING").upper()
    root = logging.getLogger("swarmlm")
    root.setLevel(level)
    if not _CONFIGURED:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        _CONFIGURED = True
