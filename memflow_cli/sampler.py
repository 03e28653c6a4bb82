"""Few-step flow matching: the shift-warped sigma table, x0 recovery and re-noising.

The arithmetic follows the released sampler exactly, including its dtypes:
the table is float32, the x0 conversion runs in float64 and re-noising in float32.
"""

from __future__ import annotations

import torch

from .settings import SamplerSettings


class FlowSchedule:
    """Sigma/timestep tables of the shifted flow-matching schedule and the warped denoising steps."""

    def __init__(self, settings: SamplerSettings):
        self.settings = settings
        n = settings.train_timesteps
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        shift = settings.shift
        self.sigmas = shift * base / (1 + (shift - 1) * base)  # [n] float32
        self.timesteps = self.sigmas * n  # [n] float32
        warped = torch.cat([self.timesteps, torch.zeros(1)])
        index = torch.tensor([n - step for step in settings.steps])
        self.denoising_timesteps: list[float] = warped[index].tolist()  # e.g. [1000, 937.5, 833.33.., 625]

    def _sigma_index(self, timestep: float, dtype: torch.dtype) -> int:
        table = self.timesteps.to(dtype)
        return int(torch.argmin((table - torch.tensor(timestep, dtype=dtype)).abs()))

    def sigma(self, timestep: float, dtype: torch.dtype = torch.float32) -> float:
        """Sigma of the table entry nearest to `timestep`, looked up in `dtype` like the reference."""
        return float(self.sigmas.to(dtype)[self._sigma_index(timestep, dtype)])

    def to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, timestep: float) -> torch.Tensor:
        """x0 = x_t - sigma * flow, computed in float64 and cast back to the flow's dtype."""
        sigma = self.sigma(timestep, torch.float64)
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """(1 - sigma) * x0 + sigma * noise, with a float32 sigma, cast to the noise's dtype.

        sigma and 1 - sigma are float32 numbers held as Python floats (1 - sigma is exact in float64 and rounds
        to the float32 difference), so nothing is copied to the device: a small host-to-device copy would make
        the host wait for the GPU at every step.
        """
        sigma = self.sigma(timestep, torch.float32)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(noise.dtype)
