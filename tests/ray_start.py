"""Starting a local Ray instance in tests, with one retry of a startup deadline.

Ray gives its GCS server and its raylet fixed deadlines to start (the GCS writes its port to a file
the driver waits for; the raylet registers with the GCS). On a 2-core machine loaded by the tests
before (compiled kernels, engine processes shutting down) either can miss it once; the next start
finds the machine quieter. Any other error, or a second timeout, stands.
"""

from __future__ import annotations

from typing import Any


def start_ray(ray: Any, **kwargs: Any) -> None:
    """``ray.init(**kwargs)``, retried once after ``ray.shutdown()`` if the node timed out starting."""
    try:
        ray.init(**kwargs)
    except Exception as e:
        if "timed out" not in str(e).lower():  # "... timed out during startup", "Timed out waiting for file ..."
            raise
        ray.shutdown()
        ray.init(**kwargs)
