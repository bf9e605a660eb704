"""The README's two commands for a fresh machine, run as a user runs them (in real processes), but tiny."""
import csv
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def first_screen_commands():
    block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_gives_two_commands_and_ci_runs_the_second():
    run, test = first_screen_commands()
    assert run.startswith("pip install -r requirements.txt -c constraints.txt && python train_seg.py --toy")
    assert test == "pip install -r requirements.txt -c constraints.txt && python -m pytest -q tests"
    assert "--amp" not in run  # the precision is chosen for the machine (--amp auto)
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pip install -q -r requirements.txt -c constraints.txt\n" in ci
    assert "\ntimeout -s ABRT 900 python -m pytest -q tests\n" in ci and "python -m pytest -q tests --slow -m slow" in ci


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
    # .ci/gpu reads the same printed table on a GPU: its figures are metrics.csv's first and last rows
    sys.path.insert(0, str(REPO / ".ci"))
    import gpu_check
    rows = list(csv.DictReader(open(tmp_path / "runs" / "mmd_deeplab_64x32_lam0.05_ml" / "metrics.csv")))
    figures = gpu_check.main_job_figures(r.stdout)
    for key, row in (("before", rows[0]), ("last", rows[-1])):
        for domain in ("source", "target"):
            assert figures[f"{key}_{domain}_val_miou"] == pytest.approx(float(row[f"{domain}_val_miou"]), abs=1e-4)


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = ("train_seg.py", "train_mmd.py", "evaluate.py", "visualize.py", "datasets.py", "bench.py", "bench_adapt.py")


def page_commands():
    """(page, command) for each of our scripts' command lines in the pages' code blocks: continuation lines
    joined, comments and the `...` that stands for the data flags dropped, `a && b` and `a ; b` split."""
    found = []
    for page in PAGES:
        blocks = page.read_text().split("```")[1::2]
        for block in blocks:
            text = block.split("\n", 1)[1].replace("\\\n", " ")
            for line in text.splitlines():
                for part in line.replace(" ; ", " && ").split(" && "):
                    argv = shlex.split(part.split(" #")[0].lstrip("!"), posix=True) if "python" in part or "torchrun" in part else []
                    argv = [a for a in argv if a != "..."]
                    for i, a in enumerate(argv):
                        if a in SCRIPTS and (i == 0 or argv[i - 1] in ("python",) or argv[0] == "torchrun"):
                            found.append((page.name, a, argv[i + 1:]))
                            break
    return found


def test_every_command_in_the_readme_and_the_docs_parses_with_the_scripts_flags():
    """A renamed or removed flag breaks a page's command: each is parsed by its script's own parser (running
    them all needs the real datasets and hours; the first screen's main job runs above)."""
    import importlib
    commands = page_commands()
    assert {p for p, _, _ in commands} >= {"README.md", "methods.md", "data.md", "benchmark.md", "running.md"}
    assert len(commands) > 30
    for page, script, argv in commands:
        parser = importlib.import_module(script[:-3]).get_args_parser()
        try:
            parser.parse_args(argv)
        except Exception as e:  # our ArgumentParser raises UserError with argparse's message
            raise AssertionError(f"{page}: python {script} {' '.join(argv)}: {e}") from None


@pytest.mark.skipif(torch.cuda.is_available(), reason="here it would run the whole check")
def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu_and_refuses_a_bad_flag():
    r = subprocess.run(["bash", str(REPO / ".ci" / "gpu")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "no CUDA GPU here" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(REPO / ".ci" / "gpu_check.py"), "--bogus"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr == "error: unrecognized arguments: --bogus\n"


def test_the_gpu_check_reports_torchrun_as_skipped_on_one_gpu_not_as_passed():
    sys.path.insert(0, str(REPO / ".ci"))
    import gpu_check
    assert "NCCL takes one GPU per process" in gpu_check.torchrun_skipped(1)
    assert gpu_check.torchrun_skipped(2) is None and gpu_check.torchrun_skipped(8) is None
