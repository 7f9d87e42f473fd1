"""``tests.ray_start.start_ray``: one more start after Ray's raylet startup deadline, nothing else."""

from __future__ import annotations

import pytest

from tests.ray_start import start_ray


class FakeRay:
    """Records calls; ``init`` raises the queued errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[str] = []

    def init(self, **kwargs) -> None:
        self.calls.append(f"init {sorted(kwargs)}")
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_a_startup_timeout_is_retried_once():
    ray = FakeRay(Exception("The current node timed out during startup. ..."))
    start_ray(ray, num_cpus=2)
    assert ray.calls == ["init ['num_cpus']", "shutdown", "init ['num_cpus']"]


def test_a_second_timeout_or_another_error_stands():
    timeout = Exception("The current node timed out during startup.")
    with pytest.raises(Exception, match="timed out"):
        start_ray(FakeRay(timeout, timeout))
    ray = FakeRay(ValueError("bad num_gpus"))
    with pytest.raises(ValueError, match="bad num_gpus"):
        start_ray(ray, num_gpus=-1)
    assert ray.calls == ["init ['num_gpus']"]
