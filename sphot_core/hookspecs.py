"""Hook specifications: one hook per stage kind.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` named
after these specifications. Each hook returns an iterable of :class:`StrategySpec`
records. Plugins are found through the ``sphot`` entry-point group; the built-in
strategies of ``sphot_plugins`` are registered the same way.

A plugin package declares its module in its ``pyproject.toml``::

    [project.entry-points.sphot]
    lorentzian = "sphot_lorentz"

and the module implements the hooks it needs, returning records::

    from sphot_core.hookspecs import StrategySpec, hookimpl

    @hookimpl
    def sphot_kernel_families():
        from .kernel import LorentzianKernel, LorentzianOptions   # heavy imports here
        return [StrategySpec(name="lorentzian", factory=LorentzianKernel,
                             options=LorentzianOptions,
                             description="Lorentzian (Cauchy) blur kernel")]

After ``pip install sphot-lorentz``, ``sphot plugins`` lists it, ``--kernel lorentzian``
selects it and ``[psf-calib.lorentzian]`` configures it. The complete, tested example
is ``tests/plugins/data/lorentz_plugin/`` (shown in ``docs/plugins.rst``). Import heavy
modules *inside* the hook functions so that listing plugins stays cheap.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import attrs
import pluggy

__all__ = ["hookspec", "hookimpl", "StrategySpec", "STAGES", "PROJECT"]

PROJECT = "sphot"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@attrs.frozen
class StrategySpec:
    """A named implementation of one stage kind.

    Attributes
    ----------
    name : str
        The name users type (matched case-insensitively, ``-`` and ``_`` alike).
    factory : callable
        ``factory(options)`` returns the stage object; ``options`` is an instance of
        ``options`` (or ``None`` when the strategy has no options class).
    options : type or None
        attrs class whose fields are the keys of the strategy's TOML table.
    aliases : tuple of str
        Other accepted names (e.g. names used by the original tool).
    description : str
        One line shown by ``sphot plugins``.
    """

    name: str
    factory: Callable[..., Any]
    options: Optional[type] = None
    aliases: Tuple[str, ...] = attrs.field(default=(), converter=tuple)
    description: str = ""


#: stage kind -> (hook name, human-readable name, config section holding ``method``)
STAGES = {
    "fitter": ("sphot_sersic_fitters", "Sersic fitter (optimizer)", "fitter"),
    "point_sources": ("sphot_point_source_fitters", "point-source fitter", "psf"),
    "refit": ("sphot_refit_strategies", "refit strategy", "refit"),
    "sky": ("sphot_sky_estimators", "sky estimator", "sky"),
    "kernel": ("sphot_kernel_families", "kernel family", "psf-calib"),
    "calibrator": ("sphot_kernel_calibrators", "kernel calibrator", "psf-calib"),
    "executor": ("sphot_executors", "executor", "executor"),
}


class SphotHookSpecs:
    """The hook specifications (one per stage kind)."""

    @hookspec
    def sphot_sersic_fitters(self) -> Iterable[StrategySpec]:
        """Sersic optimizers: factories return :class:`~sphot_core.stages.SersicFitter`."""

    @hookspec
    def sphot_point_source_fitters(self) -> Iterable[StrategySpec]:
        """Point-source fitters: :class:`~sphot_core.stages.PointSourceFitter`."""

    @hookspec
    def sphot_refit_strategies(self) -> Iterable[StrategySpec]:
        """Joint refits: :class:`~sphot_core.stages.RefitStrategy`."""

    @hookspec
    def sphot_sky_estimators(self) -> Iterable[StrategySpec]:
        """Sky estimators: :class:`~sphot_core.stages.SkyEstimator`."""

    @hookspec
    def sphot_kernel_families(self) -> Iterable[StrategySpec]:
        """PSF kernel families: :class:`~sphot_core.stages.KernelFamily`."""

    @hookspec
    def sphot_kernel_calibrators(self) -> Iterable[StrategySpec]:
        """Kernel calibrators: :class:`~sphot_core.stages.KernelCalibrator`."""

    @hookspec
    def sphot_executors(self) -> Iterable[StrategySpec]:
        """Batch executors: :class:`~sphot_core.stages.Executor`."""
