import contextlib
import importlib
import io
import os
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

# what tests pass to the training scripts: small, fast, no downloads
TINY = ["--backbone", "resnet18", "--weights", "none", "--size", "64x32", "--workers", "0", "--device", "cpu", "--amp", "off"]

Ran = namedtuple("Ran", "returncode stdout stderr")


def call(script, *argv):
    """Run a script's main() in this process as `python script argv...` would: its exit status (0, 2 for a
    user mistake, 128+N after signal N), stdout and stderr. Other exceptions (real bugs) propagate."""
    import torch
    from utils import run_main
    module = importlib.import_module(Path(script).stem)
    argv = [str(a) for a in argv]
    out, err, code, saved_argv = io.StringIO(), io.StringIO(), 0, sys.argv
    sys.argv = [script, *argv]  # what args.json records
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(lambda: module.main(module.get_args_parser().parse_args(argv)))
        except SystemExit as e:
            code = e.code or 0
        finally:  # a run that stopped early did not reach ctx.close(), nor let its loader workers go
            torch.use_deterministic_algorithms(False)
            sys.argv = saved_argv
            if code:
                import sampling
                sampling._end_workers()
    return Ran(code, out.getvalue(), err.getvalue())


def same_state(a, b):
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def data_args(pair):
    return ["--gta5-root", pair[0], "--cityscapes-root", pair[1]]


@pytest.fixture(scope="session", autouse=True)
def unsynced_files():
    """No fsync in this process: a test's checkpoints (up to 320 MB a phase-2 epoch) go to a folder removed once it
    passes, and forcing them onto the disk first set the suite's pace (17 GB), not the code's. The tests of what
    a kill or a full disk leaves behind run real processes, which fsync as always."""
    import os
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A small built-in pair (20 source, 20 target images), made once per test session."""
    import toy as generator
    root = tmp_path_factory.mktemp("toy")
    generator.make_toy(root, num_source=20, num_target=20, seed=0, source_size=(160, 88), target_size=(128, 64))
    return root / "gta5", root / "cityscapes"


@pytest.fixture(scope="session")
def odd_toy(tmp_path_factory):
    """30 + 30 images: val splits of 3 images, odd, for the multi-process evaluation check."""
    import toy as generator
    root = tmp_path_factory.mktemp("odd_toy")
    generator.make_toy(root, num_source=30, num_target=30, seed=1, source_size=(96, 53), target_size=(96, 48))
    return root / "gta5", root / "cityscapes"


@pytest.fixture(scope="session")
def phase1(toy, tmp_path_factory):
    """A tiny phase-1 DeepLabV3 run (resnet18, 64x32, 2 epochs) shared by later tests."""
    out = tmp_path_factory.mktemp("runs") / "seg"
    r = call("train_seg.py", "--model", "deeplab", *TINY, *data_args(toy), "--epochs", "2", "--batch-size", "4",
             "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (minutes each on 2 cores)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on 2 CPU cores; left out unless pytest is given --slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); .ci/gpu runs them")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="slow: run with pytest --slow"))
