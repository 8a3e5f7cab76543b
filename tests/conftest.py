import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('MPLBACKEND', 'Agg')  # no display in tests


@pytest.fixture
def root():
    "The repository root."
    return ROOT


import dalle_course.paella  # noqa: E402,F401  (registers lesson 31's priors before the registry is saved)
from dalle_course import prior as _prior  # noqa: E402

_LIBRARY_PRIORS = dict(_prior.PRIORS)


@pytest.fixture(autouse=True)
def _library_priors():
    """Notebooks that tests run in-process register their own copies of the library's classes (lesson 31's
    `PRIORS.update(...)` puts `__main__.PaellaPrior` in the library's registry); each test starts from the library's."""
    _prior.PRIORS.clear(); _prior.PRIORS.update(_LIBRARY_PRIORS)
    yield
    _prior.PRIORS.clear(); _prior.PRIORS.update(_LIBRARY_PRIORS)
