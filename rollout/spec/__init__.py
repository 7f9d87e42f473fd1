"""Speculative decoding: drafters (n-gram lookup, a draft model, an EAGLE head, a benchmark-only
oracle), the adaptive policy that decides how many tokens to draft, and the verify step on the
target model."""
