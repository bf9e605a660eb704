import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A small built-in pair (20 source, 20 target images), made once per test session."""
    import datasets
    root = tmp_path_factory.mktemp("toy")
    datasets.make_toy(root, num_source=20, num_target=20, seed=0, source_size=(160, 88), target_size=(128, 64))
    return root / "gta5", root / "cityscapes"


@pytest.fixture(scope="session")
def odd_toy(tmp_path_factory):
    """30 + 30 images: val splits of 3 images, odd, for the multi-process evaluation check."""
    import datasets
    root = tmp_path_factory.mktemp("odd_toy")
    datasets.make_toy(root, num_source=30, num_target=30, seed=1, source_size=(96, 53), target_size=(96, 48))
    return root / "gta5", root / "cityscapes"
