"""The README's two commands for a fresh machine, run as a user runs them (in real processes), but tiny."""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def first_screen_commands():
    block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_gives_two_commands_and_ci_runs_the_second():
    run, test = first_screen_commands()
    assert run.startswith("pip install -r requirements.txt && python train_seg.py --toy")
    assert test == "pip install -r requirements.txt && python -m pytest -q tests"
    assert "python -m pytest -q tests" in (REPO / ".ci" / "run").read_text()


def test_the_main_job_runs_as_written_at_a_tiny_size(toy, tmp_path):
    """Each python step of the first command, with one epoch at 64x32 in fp32 appended (argparse keeps the
    last value; bf16's first steps on a CPU cost seconds each), from a fresh folder whose data/toy holds a
    small built-in pair."""
    shutil.copytree(toy[0], tmp_path / "data" / "toy" / "gta5")
    shutil.copytree(toy[1], tmp_path / "data" / "toy" / "cityscapes")
    steps = first_screen_commands()[0].split(" && ")[1:]  # the install: this machine has the packages
    assert [shlex.split(s)[:2] for s in steps] == [["python", "train_seg.py"], ["python", "train_mmd.py"]]
    for step in steps:
        argv = shlex.split(step)
        r = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:], "--epochs", "1", "--size", "64x32",
                            "--amp", "off", "--workers", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
    assert "target val mIoU" in r.stdout and "before adaptation" in r.stdout
    assert (tmp_path / "runs" / "seg_deeplab_64x32" / "best.pt").exists()
