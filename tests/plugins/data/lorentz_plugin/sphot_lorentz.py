"""sphot-lorentz: a Lorentzian PSF kernel family for sphot (a complete plugin example).

The kernel is the 2-D Cauchy profile ``K(r) ~ (1 + r^2 / gamma^2) ** -1.5``, whose
projection on any axis is a Lorentzian of half width at half maximum ``gamma``. Its
wings fall as ``r**-3`` and never converge fast, so it is cut at ``radius`` pixels and
renormalised.

sphot finds this module through the entry point declared by the distribution::

    [project.entry-points.sphot]
    lorentzian = "sphot_lorentz"

and calls its hook ``sphot_kernel_families``; ``--kernel lorentzian`` selects the
family and the table ``[psf-calib.lorentzian]`` sets its options.
"""

import math

import attrs
import numpy as np

from sphot_core.errors import ConfigError
from sphot_core.hookspecs import StrategySpec, hookimpl
from sphot_core.stages import KernelFamily, KernelParameter


@attrs.frozen
class LorentzianOptions:
    """Keys of ``[psf-calib.lorentzian]``."""

    #: cut radius of the kernel, image pixels
    radius: float = attrs.field(default=10.0, validator=attrs.validators.gt(0.0))
    #: upper bound of gamma, image pixels
    max_gamma: float = attrs.field(default=3.0, validator=attrs.validators.gt(0.0))


class LorentzianKernel(KernelFamily):
    """Lorentzian blur: ``K(r) ~ (1 + r^2 / gamma^2) ** -1.5`` for ``r <= radius``."""

    name = "lorentzian"
    Options = LorentzianOptions

    def parameters(self):
        return (
            KernelParameter(
                "gamma",
                start=0.5,
                lower=0.0,
                upper=self.options.max_gamma,
                description="half width at half maximum of the projected profile",
            ),
        )

    def identity(self):
        return {"gamma": 0.0}

    def render(self, params, oversample):
        gamma = float(params["gamma"]) * oversample  # image pixels -> PSF grid elements
        if not gamma >= 0:
            raise ConfigError(f"kernel 'lorentzian': gamma must be >= 0, got {params['gamma']!r}")
        if gamma == 0:
            return np.ones((1, 1))  # the identity: a delta function
        radius = self.options.radius * oversample
        half = int(math.ceil(radius))
        r = np.arange(-half, half + 1)
        r2 = r[:, None] ** 2 + r[None, :] ** 2
        k = (1.0 + r2 / gamma**2) ** -1.5
        k[r2 > radius**2] = 0.0
        return k / k.sum()  # odd-sized, centred, non-negative, unit sum


@hookimpl
def sphot_kernel_families():
    return [
        StrategySpec(
            name="lorentzian",
            factory=LorentzianKernel,
            options=LorentzianOptions,
            aliases=("lorentz",),
            description="Lorentzian (2-D Cauchy) blur kernel, cut at a fixed radius",
        )
    ]
