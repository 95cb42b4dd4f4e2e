"""The exception hierarchy: exit codes, pickling (errors cross process boundaries)."""

import pickle

import pytest

from sphot_core import errors


@pytest.mark.parametrize(
    "cls, code",
    [
        (errors.ConfigError, 2),
        (errors.InputError, 3),
        (errors.PluginError, 4),
        (errors.FitError, 5),
        (errors.DegenerateCutoutError, 6),
        (errors.OutputError, 7),
        (errors.PartialFailure, 8),
    ],
)
def test_every_error_pickles_with_its_context(cls, code):
    exc = cls("something went wrong in F150W", path="/x/g.h5", filter="F150W")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == str(exc)
    assert back.path == "/x/g.h5" and back.filter == "F150W" and back.context == exc.context
    assert back.exit_code == code
    assert isinstance(back, errors.SphotError)


def test_degenerate_cutouts_are_both_fit_and_input_errors():
    assert issubclass(errors.DegenerateCutoutError, errors.FitError)
    assert issubclass(errors.DegenerateCutoutError, errors.InputError)
