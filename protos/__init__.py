"""The rollout.v1 protocol: ``rollout.proto`` and its generated modules (see ``generate.py``)."""
