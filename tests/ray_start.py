"""Starting a local Ray instance in tests, with one retry of the raylet's startup deadline.

Ray gives its raylet a fixed 30 s to register with the GCS. On a 2-core machine loaded by the
tests before (compiled kernels, engine processes shutting down) it can miss that once; the next
start finds the machine quieter. Any other error, or a second timeout, stands.
"""

from __future__ import annotations

from typing import Any


def start_ray(ray: Any, **kwargs: Any) -> None:
    """``ray.init(**kwargs)``, retried once after ``ray.shutdown()`` if the node timed out starting."""
    try:
        ray.init(**kwargs)
    except Exception as e:
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(**kwargs)
