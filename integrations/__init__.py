"""Integrations with RL frameworks (veRL rollout backend, Ray actors)."""
