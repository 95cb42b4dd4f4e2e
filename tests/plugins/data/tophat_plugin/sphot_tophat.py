"""A minimal third-party plugin: a top-hat (uniform disc) kernel family."""

import attrs
import numpy as np

from sphot_core.hookspecs import StrategySpec, hookimpl
from sphot_core.stages import KernelFamily, KernelParameter


@attrs.frozen
class TophatOptions:
    supersample: int = 5


class Tophat(KernelFamily):
    Options = TophatOptions

    def parameters(self):
        return (KernelParameter("radius", start=0.5, lower=0.05, upper=4.0),)

    def render(self, params, oversample):
        r = params["radius"] * oversample
        half = int(np.ceil(r)) + 1
        s = self.options.supersample
        sub = (np.arange(s) + 0.5) / s - 0.5
        grid = np.arange(-half, half + 1)
        yy = (grid[:, None, None, None] + sub[None, None, :, None]) ** 2
        xx = (grid[None, :, None, None] + sub[None, None, None, :]) ** 2
        k = ((yy + xx) <= r * r).mean(axis=(2, 3))
        if k.sum() == 0:
            k[half, half] = 1.0
        return k / k.sum()


@hookimpl
def sphot_kernel_families():
    return [StrategySpec(name="tophat", factory=Tophat, options=TophatOptions, description="uniform disc (test plugin)")]
