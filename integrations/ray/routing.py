"""The routing rule of data-parallel replicas: prompt-prefix affinity, bounded by load.

Each request carries a prompt and ``n`` samples. The rule, per request:

1. The key is a hash of the prompt's first ``prefix_tokens`` token ids (or ``4 * prefix_tokens``
   characters of a text prompt): prompts that share that prefix share a key.
2. If the key was routed before and that replica's outstanding samples are within
   ``balance_slack`` of the least-loaded replica's, it goes there again: its prefix cache holds the
   prompt's KV.
3. Otherwise it goes to the least-loaded replica (ties broken by a hash of the key, so the choice
   does not depend on replica order), which becomes the key's replica.

A request is never split: its ``n`` samples (a GRPO group) all run on one replica, where they share
the prompt's KV. Load is counted in samples, since a group of 16 costs sixteen decode rows.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from typing import Sequence

from rollout.errors import InvalidArgumentError

Prompt = Sequence[int] | str


class PrefixAffinityPolicy:
    """Picks a replica per request and tracks the outstanding samples of each replica.

    Not thread-safe: one router (one event loop) owns it.
    """

    def __init__(self, num_replicas: int, *, prefix_tokens: int = 256, balance_slack: int = 32,
                 table_size: int = 65536) -> None:
        if num_replicas < 1:
            raise InvalidArgumentError("must be >= 1", field="num_replicas")
        if prefix_tokens < 1:
            raise InvalidArgumentError("must be >= 1", field="prefix_tokens")
        if balance_slack < 0:
            raise InvalidArgumentError("must be >= 0", field="balance_slack")
        if table_size < 1:
            raise InvalidArgumentError("must be >= 1", field="table_size")
        self.num_replicas = num_replicas
        self.prefix_tokens = prefix_tokens
        self.balance_slack = balance_slack
        self.table_size = table_size
        self._outstanding = [0] * num_replicas
        self._routed = [0] * num_replicas  # requests sent to each replica so far
        self._table: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> replica, LRU order

    @property
    def outstanding(self) -> tuple[int, ...]:
        """Samples in flight per replica."""
        return tuple(self._outstanding)

    @property
    def routed(self) -> tuple[int, ...]:
        """Requests routed to each replica so far."""
        return tuple(self._routed)

    def key(self, prompt: Prompt) -> bytes:
        """The affinity key of a prompt: a digest of its prefix."""
        if isinstance(prompt, str):
            data = b"t" + prompt[: 4 * self.prefix_tokens].encode("utf-8", "surrogatepass")
        else:
            ids = [int(t) for t in list(prompt)[: self.prefix_tokens]]
            data = b"i" + struct.pack(f"<{len(ids)}q", *ids)
        return hashlib.blake2b(data, digest_size=16).digest()

    def _tie_order(self, key: bytes, replica: int) -> bytes:
        return hashlib.blake2b(key + replica.to_bytes(4, "little"), digest_size=8).digest()

    def replica_of(self, prompt: Prompt) -> int | None:
        """The replica this prompt's prefix was last routed to, if it is remembered."""
        return self._table.get(self.key(prompt))

    def choose(self, prompt: Prompt, samples: int) -> int:
        """The replica for a request of ``samples`` samples; counts them as outstanding there."""
        if samples < 1:
            raise InvalidArgumentError("must be >= 1", field="samples")
        key = self.key(prompt)
        least = min(self._outstanding)
        replica = self._table.get(key)
        if replica is None or self._outstanding[replica] > least + self.balance_slack:
            candidates = [r for r, load in enumerate(self._outstanding) if load == least]
            replica = max(candidates, key=lambda r: self._tie_order(key, r))
        self._table[key] = replica
        self._table.move_to_end(key)
        while len(self._table) > self.table_size:
            self._table.popitem(last=False)
        self._outstanding[replica] += samples
        self._routed[replica] += 1
        return replica

    def finished(self, replica: int, samples: int) -> None:
        """A request of ``samples`` samples on ``replica`` ended (finished, failed or cancelled)."""
        self._outstanding[replica] -= samples
        assert self._outstanding[replica] >= 0, "finished() without a matching choose()"
