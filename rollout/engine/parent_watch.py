"""Engine processes end with the process that started them.

The server's front end spawns every engine rank. Killed without a chance to stop them (SIGKILL, an
OOM kill), it would leave them running: rank 0 polling an inbox nobody writes, the other ranks
waiting in a collective for up to the rank timeout, all holding their GPU memory. Each rank
watches its parent instead and exits once the parent is gone (the rank is then re-parented).
"""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

POLL_S = 1.0


def exit_with_parent(parent: int, poll_s: float = POLL_S) -> threading.Thread:
    """Start a daemon thread that ends this process (exit code 1) once ``parent`` (the pid of the
    process that spawned it, passed down: a child that only reads ``os.getppid()`` after its slow
    start could read the pid of the process it was re-parented to) is no longer its parent.

    ``os.getppid`` is polled rather than ``PR_SET_PDEATHSIG`` set: that signal follows the parent's
    *thread* that spawned the child, and the server spawns its engine from a worker thread.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logger.error("the process that started this engine (pid %d) is gone: exiting", parent)
        logging.shutdown()
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
