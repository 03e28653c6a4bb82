"""The flow-matching schedule: warped steps, and re-noising exactly as the reference's float32 arithmetic."""

from __future__ import annotations

import pytest
import torch

from memflow_cli.sampler import FlowSchedule
from memflow_cli.settings import SamplerSettings


@pytest.fixture(scope="module")
def schedule() -> FlowSchedule:
    return FlowSchedule(SamplerSettings())


def test_warped_denoising_steps(schedule: FlowSchedule) -> None:
    assert schedule.denoising_timesteps == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_is_the_float32_tensor_formula_bit_for_bit(schedule: FlowSchedule, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 16, 8, 12, generator=generator).to(dtype)
    noise = torch.randn(1, 3, 16, 8, 12, generator=generator).to(dtype)
    for timestep in schedule.denoising_timesteps[1:]:
        sigma = torch.tensor([schedule.sigma(timestep)], dtype=torch.float32)  # the reference's 1-element tensor
        expected = ((1 - sigma) * x0.float() + sigma * noise.float()).to(dtype)
        assert torch.equal(schedule.add_noise(x0, noise, timestep), expected)
