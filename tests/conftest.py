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


@pytest.fixture(scope="session")
def phase1(toy, tmp_path_factory):
    """A tiny phase-1 DeepLabV3 run (resnet18, 64x32, 2 epochs) shared by later tests."""
    import subprocess
    out = tmp_path_factory.mktemp("runs") / "seg"
    r = subprocess.run([sys.executable, str(ROOT / "train_seg.py"), "--model", "deeplab", "--backbone", "resnet18",
                        "--weights", "none", "--size", "64x32", "--workers", "0", "--device", "cpu",
                        "--gta5-root", str(toy[0]), "--cityscapes-root", str(toy[1]), "--epochs", "2",
                        "--batch-size", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out
