"""Every built-in strategy passes the plugin-author conformance checks."""

from __future__ import annotations

import pytest

from sphot_core.hookspecs import STAGES
from sphot_core.registry import Registry
from sphot_core.testing import check_plugin, checks_for, plugin_checks
from sphot_plugins.kernels import GaussianKernel

_REG = Registry(autoload=False)
BUILTINS = [
    _REG.create(stage, r.name, {"jobs": 1} if stage == "executor" else None)
    for stage in STAGES
    for r in _REG.strategies(stage)
    if not (stage == "executor" and r.name != "serial")  # pools are exercised in test_executors
]


@plugin_checks(*BUILTINS)
def test_builtin_strategy(plugin, check):
    check(plugin)


class Shifted(GaussianKernel):
    """A broken family: its kernels are even-sized (off-centre)."""

    def render(self, params, oversample):
        k = super().render(params, oversample)
        return k[1:, 1:] if k.shape[0] > 3 else k


def test_a_broken_kernel_family_is_caught():
    with pytest.raises(AssertionError, match="check_kernel_render"):
        check_plugin(Shifted())


def test_a_plugin_that_does_not_pickle_is_caught():
    class Local(GaussianKernel):
        pass

    with pytest.raises(AssertionError, match="does not pickle"):
        check_plugin(Local())


def test_unknown_objects_are_rejected():
    with pytest.raises(TypeError, match="none of the sphot stage contracts"):
        checks_for(object())
