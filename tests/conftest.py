import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('MPLBACKEND', 'Agg')  # no display in tests


@pytest.fixture
def root():
    "The repository root."
    return ROOT
