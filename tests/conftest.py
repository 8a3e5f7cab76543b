import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('MPLBACKEND', 'Agg')  # no display in tests


@pytest.fixture
def root():
    "The repository root."
    return ROOT


from dalle_course.core import MODELS as _MODELS  # noqa: E402

_LIBRARY_MODELS = {role: dict(kinds) for role, kinds in _MODELS.items()}


@pytest.fixture(autouse=True)
def _library_models():
    """Notebooks that tests run in-process may register classes of their own (`register_model`, lesson 00); each
    test starts from the library's registry."""
    def restore():
        _MODELS.clear(); _MODELS.update({role: dict(kinds) for role, kinds in _LIBRARY_MODELS.items()})
    restore()
    yield
    restore()
