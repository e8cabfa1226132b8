"""Shared code of offline-marl: datasets, environments, runs and benchmarks.

The algorithm files (``comadice.py``, ``alberdice.py``, ``omcda.py``,
``baselines/*.py``) import from here and from nowhere else in the project.
"""

from __future__ import annotations

import contextlib
import os
import sys


class OfflineMarlError(Exception):
    """An error caused by the user's input (a bad name, a missing file, missing
    software). Its message is one sentence that says what is wrong and what to do;
    scripts print it without a traceback."""


class DivergenceError(OfflineMarlError):
    """A loss, a parameter or a sampling weight became NaN or infinite: the run stops without a
    result (the last good checkpoint is kept)."""


@contextlib.contextmanager
def friendly_errors():
    """Turn an ``OfflineMarlError`` into one line on stderr and exit status 2.

    Set ``OFFLINE_MARL_DEBUG=1`` to see the full traceback instead."""
    try:
        yield
    except OfflineMarlError as e:
        if os.environ.get("OFFLINE_MARL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
