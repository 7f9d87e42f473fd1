"""Slow parts of control commands that run beside the engine loop instead of inside it.

Joining a trainer's weight group waits for the trainer (up to the join's timeout); doing that in
the loop would stall generation. A control handler returns a ``Background`` instead of its result:
the loop runs ``work`` in a thread of its own, keeps stepping, and when the work is done runs
``finish`` (or ``fail``) on the loop's thread, so whatever state they touch keeps one owner, and
only then replies to the caller.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)


def _ignore(error: BaseException) -> None:
    del error


@dataclass
class Background:
    """A control command's slow part: ``work()`` off the loop, then ``finish(result)`` on it.

    ``fail(error)`` runs on the loop when ``work`` raised (the error then goes to the caller);
    ``abandon(future)`` runs when the engine stops before the work ended (e.g. to close a group
    that forms after all).
    """

    work: Callable[[], Any]
    finish: Callable[[Any], Any]
    fail: Callable[[BaseException], None] = _ignore
    abandon: Callable[[concurrent.futures.Future], None] = lambda fut: None
    name: str = "control"
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def start(self) -> None:
        """Run ``work`` in a daemon thread; its outcome lands in ``future``."""

        def run() -> None:
            try:
                self.future.set_result(self.work())
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which replies with it
                self.future.set_exception(e)

        threading.Thread(target=run, name=f"engine-{self.name}", daemon=True).start()

    def complete(self) -> Any:
        """On the loop, once ``future`` is done: ``finish`` its result, or ``fail`` and re-raise."""
        error = self.future.exception()
        if error is not None:
            self.fail(error)
            raise error
        return self.finish(self.future.result())
