"""Sampling kernels: one pass over a step's logits instead of a chain of full-vocabulary torch ops.

The torch formulation in ``rollout/sampling/sampler.py`` is the reference they are tested against.
"""

from kernels.sampling.filtered import sample_rows_filtered
from kernels.sampling.inverse_cdf import sample_rows

__all__ = ["sample_rows", "sample_rows_filtered"]
