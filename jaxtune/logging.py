"""jaxtune's log: one `logging` logger for people (warnings, progress lines).

Warnings about configuration are emitted once each per process (`warn_once`), so a key that means
nothing on JAX is reported exactly one time however often the config is resolved.
"""

from __future__ import annotations

import logging as _logging
import sys

logger = _logging.getLogger("jaxtune")
_warned: set[str] = set()


def _ensure_handler() -> None:
    if not logger.handlers and not _logging.getLogger().handlers:
        handler = _logging.StreamHandler(sys.stderr)
        handler.setFormatter(_logging.Formatter("jaxtune: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(_logging.INFO)
        logger.propagate = True


def info(message: str) -> None:
    _ensure_handler()
    logger.info(message)


def warn_once(message: str) -> None:
    if message in _warned:
        return
    _warned.add(message)
    _ensure_handler()
    logger.warning(message)
