"""sphot's built-in strategies, registered through the ``sphot`` entry-point group.

Each hook imports its module lazily, so listing plugins or building ``--help`` does not
import the numerical code. Every module exports ``SPECS``, a list of
:class:`~sphot_core.hookspecs.StrategySpec`.
"""

from sphot_core.hookspecs import hookimpl

__distribution__ = "sphot"


@hookimpl
def sphot_sersic_fitters():
    from . import optimizers

    return optimizers.SPECS


@hookimpl
def sphot_point_source_fitters():
    from . import point_sources

    return point_sources.SPECS


@hookimpl
def sphot_refit_strategies():
    from . import refits

    return refits.SPECS


@hookimpl
def sphot_sky_estimators():
    from . import sky

    return sky.SPECS


@hookimpl
def sphot_kernel_families():
    from . import kernels

    return kernels.SPECS


@hookimpl
def sphot_kernel_calibrators():
    from . import calibration

    return calibration.SPECS


@hookimpl
def sphot_executors():
    from . import executors

    return executors.SPECS
