"""sphot: galaxies measured through crowded star fields.

The public Python API (imported lazily, so ``import sphot_core`` stays cheap)::

    from sphot_core import load_config, load_galaxy, run
    config = load_config("sphot_config.toml", overrides={"refit.method": "nnls"})
    galaxy = load_galaxy("g260.h5", psf="psf/", config=config)
    result = run(galaxy, config)

See the documentation for the stages, the plugin system and the command line.
"""

from ._version import __version__

__all__ = ["__version__", "load_config", "load_galaxy", "run", "run_file", "save", "read_sphot", "SphotError"]

_LAZY = {
    "load_config": ("sphot_core.config", "load_config"),
    "load_galaxy": ("sphot_core.io", "load_galaxy"),
    "save": ("sphot_core.io", "write_outputs"),
    "read_sphot": ("sphot_core.io", "read_sphot"),
    "run": ("sphot_core.engine", "run"),
    "run_file": ("sphot_core.engine", "run_file"),
    "SphotError": ("sphot_core.errors", "SphotError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sphot_core' has no attribute {name!r}")
