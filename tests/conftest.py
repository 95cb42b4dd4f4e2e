"""Shared fixtures: where the real data lives and cached PSFs."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPHOT_SHARED_DATA", REPO.parent / "shared" / "data"))
FILTERS = ("F555W", "F814W", "F090W", "F150W", "F160W", "F277W")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$SPHOT_SHARED_DATA``); tests needing it skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def psf_dir(shared_data) -> Path:
    return shared_data / "psf"


@pytest.fixture(scope="session")
def galaxy_dir(shared_data) -> Path:
    return shared_data / "galaxies"


@functools.lru_cache(maxsize=None)
def _load_psf(path: str, filter_name: str):
    from sphot_core.psf import PSFModel

    return PSFModel.from_array(np.load(path), 4, filter=filter_name, source=path)


@pytest.fixture(scope="session")
def load_psf(psf_dir):
    """``load_psf("F150W")`` -> the real PSF as a :class:`PSFModel` (cached)."""

    def load(filter_name: str):
        matches = sorted(psf_dir.glob(f"{filter_name}_*.npy"))
        if not matches:
            pytest.skip(f"no PSF for {filter_name} in {psf_dir}")
        return _load_psf(str(matches[0]), filter_name)

    return load


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pid_gone(pid: int, wait: float = 5.0) -> bool:
    """Whether process ``pid`` has exited (polled for up to ``wait`` seconds)."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def dask_cluster():
    """A dask LocalCluster started by the tests, on the loopback interface."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster
