"""A test plugin whose import fails."""

import sphot_this_module_does_not_exist  # noqa: F401
