"""The test helpers keep their promises: an in-process `run --once` leaves no handler, signal
handler or logger level behind for the next test."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from helpers import run_once


def test_run_once_in_process_leaves_loggers_and_signals_as_it_found_them(root: Path) -> None:
    logger = logging.getLogger("dropbox_runner")
    before = (
        logger.level,
        list(logger.handlers),
        signal.getsignal(signal.SIGTERM),
        signal.getsignal(signal.SIGINT),
    )
    run_once(root)
    after = (
        logger.level,
        list(logger.handlers),
        signal.getsignal(signal.SIGTERM),
        signal.getsignal(signal.SIGINT),
    )
    assert after == before
