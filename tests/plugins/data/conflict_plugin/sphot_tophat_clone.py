"""A test plugin claiming the kernel-family name of another package ("TopHat")."""

from sphot_core.hookspecs import StrategySpec, hookimpl


@hookimpl
def sphot_kernel_families():
    from sphot_tophat import Tophat

    return [StrategySpec(name="TopHat", factory=Tophat, description="a clone claiming the same name")]
