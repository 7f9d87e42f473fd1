"""ROLLOUT_PDL picks the kinds of kernel that launch with programmatic dependent launch; off the
GPU (or in the interpreter) nothing does."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.triton_utils import pdl_enabled, pdl_kinds, pdl_launch  # noqa: E402


@pytest.mark.parametrize("mode,kinds", [
    ("0", ()), ("off", ()), ("linear", ("linear",)), ("decode", ("linear", "decode")),
    ("all", ("linear", "decode", "attention")), (" ALL ", ("linear", "decode", "attention")),
    ("1", ("linear", "decode")),  # an unknown value means the default
])
def test_modes_name_the_kinds(mode, kinds, monkeypatch) -> None:
    monkeypatch.setenv("ROLLOUT_PDL", mode)
    assert pdl_kinds() == kinds


def test_default_is_linear_and_decode(monkeypatch) -> None:
    monkeypatch.delenv("ROLLOUT_PDL", raising=False)
    assert pdl_kinds() == ("linear", "decode")


def test_cpu_tensors_never_launch_with_pdl(monkeypatch) -> None:
    monkeypatch.setenv("ROLLOUT_PDL", "all")
    x = torch.zeros(2)
    assert not any(pdl_enabled(x, kind) for kind in ("linear", "decode", "attention"))
    assert pdl_launch(x, "decode") == {"PDL": False}
