"""Waiting on an engine or a server in tests: every wait has a short deadline and says what the engine
failed to do, so a request that never finishes (a leaked KV slot, a lost result) fails the test in
seconds instead of hanging it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from rollout.client import RolloutClient

# Far above what the small workloads of these tests take (a few seconds at most on 2 busy cores),
# far below a hang.
WAIT_S = 30.0


def join_all(threads: Iterable[threading.Thread], what: str, seconds: float = WAIT_S) -> None:
    """Join ``threads`` within one shared deadline; ``what`` says what the engine failed to do if some
    are still waiting then (e.g. "the engine did not finish every request")."""
    threads = list(threads)
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"{what} within {seconds:.0f} s: {len(stuck)} of {len(threads)} callers still wait ({stuck})"


class StreamReader:
    """Consumes a stream of chunks (``index``, ``token_ids``, ``finished``) in a daemon thread, so the
    test can act while tokens arrive. Works for in-process ``Engine.stream`` and client streams."""

    def __init__(self, stream: Iterable[Any], name: str = "stream") -> None:
        self.name = name
        self.tokens: dict[int, list[int]] = {}  # sample index -> its tokens so far
        self.final: dict[int, Any] = {}  # sample index -> its finished chunk
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._run, args=(stream,), name=name, daemon=True)
        self._thread.start()

    @property
    def ids(self) -> list[int]:
        """Tokens of sample 0 (the only one when n is 1)."""
        return self.tokens.get(0, [])

    @property
    def last(self) -> Any:
        """The finished chunk of sample 0, or None."""
        return self.final.get(0)

    def _run(self, stream: Iterable[Any]) -> None:
        try:
            for ch in stream:
                with self._cond:
                    self.tokens.setdefault(ch.index, []).extend(ch.token_ids)
                    if ch.finished:
                        assert ch.index not in self.final, f"{self.name}: two final chunks for sample {ch.index}"
                        self.final[ch.index] = ch
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported by the waits
            self.error = e
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def wait_tokens(self, count: int = 1, samples: int = 1, seconds: float = WAIT_S) -> None:
        """Until each of samples ``0..samples-1`` has at least ``count`` tokens (and is still going)."""

        def enough() -> bool:
            return all(len(self.tokens.get(i, [])) >= count for i in range(samples))

        with self._cond:
            got = self._cond.wait_for(lambda: self._ended or enough(), seconds)
        assert self.error is None, f"{self.name} failed: {self.error!r}"
        have = {i: len(self.tokens.get(i, [])) for i in range(samples)}
        assert got, f"{self.name}: the engine sent {have} tokens per sample within {seconds:.0f} s, not {count} each"
        assert enough(), f"{self.name}: the engine ended the stream with only {have} tokens per sample"

    def join(self, seconds: float = WAIT_S) -> None:
        """Until the stream has ended (every sample finished); fails if the engine never ends it."""
        self._thread.join(seconds)
        assert not self._thread.is_alive(), (
            f"{self.name}: the engine did not end the stream within {seconds:.0f} s "
            f"(finished samples {sorted(self.final)}, tokens {[len(t) for t in self.tokens.values()]})"
        )
        assert self.error is None, f"{self.name} failed: {self.error!r}"


class DeadlineClient(RolloutClient):
    """A ``RolloutClient`` whose streams and generate calls also get its ``timeout`` as their deadline
    (the client's own default leaves them unbounded), so a request the server never finishes fails the
    test with DEADLINE_EXCEEDED instead of hanging it."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", WAIT_S)
        super().__init__(address, **kwargs)

    def stream(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return super().stream(*args, timeout=self.timeout if timeout is None else timeout, **kwargs)

    def generate(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return super().generate(*args, timeout=self.timeout if timeout is None else timeout, **kwargs)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False
