"""Where users run it: the versions it needs, the device --device auto picks (and why it leaves a GPU out), the
loader workers a laptop gets, and an install that keeps the PyTorch a platform already has."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import devices
import utils
from utils import UserError

REPO = Path(__file__).resolve().parent.parent

LINUX = {"system": "Linux", "machine": "x86_64", "torch": "2.13.0+cu130", "cuda_build": "13.0", "cuda": False,
         "mps_built": False, "mps": False, "nvidia_driver": None}
MAC = {**LINUX, "system": "Darwin", "machine": "arm64", "torch": "2.13.0", "cuda_build": None, "mps_built": True,
       "apple_silicon": True, "mac_version": "14.5"}


def gpu(capability, arch_list, name="Tesla P100-PCIE-16GB"):
    return {**LINUX, "cuda": True, "nvidia_driver": 590, "gpu": name, "capability": capability, "arch_list": arch_list}


CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("facts,device,why", [
    (LINUX, "cpu", None),  # no GPU here: nothing to say
    ({**LINUX, "nvidia_driver": 535}, "cpu", "the NVIDIA driver here is 535, older than the 580 that this PyTorch's "
                                             "CUDA 13.0 needs; update the driver, or install a PyTorch built for CUDA 12.6"),
    ({**LINUX, "nvidia_driver": 590, "cuda_build": None, "torch": "2.13.0+cpu"}, "cpu",
     "an NVIDIA GPU is here, but this PyTorch 2.13.0+cpu is built without CUDA"),
    ({**LINUX, "nvidia_driver": 0}, "cpu", "an NVIDIA GPU is here, but CUDA 13.0 does not start"),  # /dev/nvidia0 only
    (gpu((6, 0), CU130), "cpu", "the Tesla P100-PCIE-16GB (compute capability 6.0) has no kernels in this PyTorch"),
    (gpu((7, 5), CU130, "Tesla T4"), "cuda", None),
    (gpu((8, 9), CU130, "NVIDIA L4"), "cuda", None),  # sm_86's binary runs on 8.9
    (gpu((12, 1), CU130, "NVIDIA GB10"), "cuda", None),  # sm_120's binary runs on 12.1
    (gpu((13, 0), CU130, "a GPU after this build"), "cuda", None),  # compute_120's PTX compiles for it
    (gpu((7, 0), ["sm_80", "sm_90"], "Tesla V100"), "cpu", "no kernels"),
    (gpu((9, 4), ["gfx90a", "gfx942"], "AMD Instinct MI300X"), "cuda", None),  # ROCm: its own targets
    ({**MAC, "mps": True}, "mps", None),
    ({**MAC, "mac_version": "13.6.1"}, "cpu", "MPS needs macOS 14 or newer with PyTorch 2.9 and later (this Mac runs "
                                              "macOS 13.6.1); update macOS"),
    ({**MAC, "machine": "x86_64"}, "cpu", "this Python is an x86_64 build running under Rosetta on Apple silicon"),
    ({**MAC, "mps_built": False}, "cpu", "this PyTorch was built without MPS"),
    ({**MAC, "apple_silicon": False, "machine": "x86_64", "mac_version": "12.7"}, "cpu", None),  # an Intel Mac
])
def test_auto_says_why_a_gpu_that_is_here_is_not_used(facts, device, why, capsys, monkeypatch):
    monkeypatch.setattr(devices, "_WARNED", set())
    picked = devices.pick_device("auto", warn=True, facts=facts)
    assert picked.type == device
    err = capsys.readouterr().err
    if why is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("warning: --device auto: ") and why in err, err
        assert err.rstrip().endswith("; running on the CPU")
        # once a process: the flag checks and the Context both pick the device
        assert devices.pick_device("auto", warn=True, facts=facts).type == "cpu" and capsys.readouterr().err == ""


def test_the_driver_version_is_read_from_both_of_nvidias_kernel_modules():
    proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    open_module = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                   "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025\nGCC version:  gcc version 12.2.0\n")
    assert devices.driver_version(proprietary) == 535 and devices.driver_version(open_module) == 580
    assert devices.driver_version("") == 0


def test_gpus_hidden_on_purpose_and_the_cpu_asked_for_are_left_alone(monkeypatch, capsys):
    """CUDA_VISIBLE_DEVICES="" hides the GPUs: nothing to warn about. --device cpu probes nothing (the probe would
    start CUDA on a GPU machine)."""
    monkeypatch.setattr(devices, "_WARNED", set())
    assert devices.pick_device("auto", warn=True, facts={**LINUX, "nvidia_driver": 590, "cuda_hidden": True}).type == "cpu"
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.device_facts()["cuda_hidden"] is True
    monkeypatch.setattr(devices, "device_facts", lambda *a: pytest.fail("--device cpu probed the machine"))
    assert devices.pick_device("cpu") == torch.device("cpu")


def test_a_gpu_named_by_hand_that_cannot_run_is_refused_with_the_reason():
    with pytest.raises(UserError, match=r"^--device cuda: the NVIDIA driver here is 535, older than the 580"):
        devices.pick_device("cuda", facts={**LINUX, "nvidia_driver": 535})
    with pytest.raises(UserError, match=r"^--device cuda: the Tesla P100-PCIE-16GB \(compute capability 6.0\)"):
        devices.pick_device("cuda", facts=gpu((6, 0), CU130))
    with pytest.raises(UserError, match=r"^--device mps: MPS needs macOS 14"):
        devices.pick_device("mps", facts={**MAC, "mac_version": "13.6.1"})
    with pytest.raises(UserError, match="^--device cuda: no CUDA device is available here; or use --device cpu$"):
        devices.pick_device("cuda", facts=LINUX)


def test_the_facts_of_this_machine_are_read_without_error():
    facts = devices.device_facts()
    assert facts["cuda"] is torch.cuda.is_available() and facts["torch"] == torch.__version__
    assert devices.pick_device("auto", facts=facts).type in ("cpu", "cuda", "mps")


@pytest.mark.parametrize("cpus,method,local_world,want", [(2, "fork", 1, 2), (64, "fork", 1, 8), (64, "fork", 4, 8),
                                                          (12, "fork", 4, 3), (1, "fork", 2, 1), (10, "spawn", 1, 2),
                                                          (1, "spawn", 1, 1)])
def test_loader_workers_fit_the_machine_and_spawned_ones_stay_few(cpus, method, local_world, want):
    assert devices.default_workers(cpus, method, local_world) == want


@pytest.mark.parametrize("found,problem", [
    ({"Python": "3.9.18", "torch": "2.8.0+cu128", "torchvision": "0.23.0+cu128", "numpy": "1.26.4"}, None),
    ({"Python": "3.12.1", "torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.0"}, None),
    ({"Python": "3.11.7", "torch": "2.7.1+cu126", "torchvision": "0.22.1", "numpy": "2.0.2"},
     "torch 2.7.1+cu126 is older than this project supports (2.8 or newer): `pip install -r requirements.txt` "
     "upgrades it"),
    ({"Python": "3.11.7", "torch": "2.8.0", "torchvision": "0.23.0", "numpy": "1.25.2"}, "numpy 1.25.2 is older"),
    ({"Python": "3.8.18", "torch": "2.8.0", "torchvision": "0.23.0", "numpy": "2.0.2"},
     "Python 3.8.18 is older than this project supports (3.9 or newer): use a newer Python"),
    ({"Python": "3.11.7", "torch": "2.8.0", "torchvision": None, "numpy": "2.0.2"}, "torchvision is not installed"),
    ({"Python": "3.11.7", "torch": "2.10.0a0+git1234", "torchvision": "0.25.0a0", "numpy": "2.3.0.dev0"}, None),
])
def test_versions_older_than_the_lower_bounds_are_named_in_one_line(found, problem):
    said = utils.version_problem(found)
    assert (said is None) if problem is None else (problem in said and "\n" not in said)


def test_a_torch_older_than_the_lower_bound_stops_a_script_in_one_line(tmp_path):
    """The check runs when utils is imported, before anything can fail on an API the old version lacks."""
    fake = tmp_path / "sitecustomize.py"
    fake.write_text("import torch\ntorch.__version__ = '2.7.1+cu126'\n")
    r = subprocess.run([sys.executable, "train_seg.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == ("error: torch 2.7.1+cu126 is older than this project supports (2.8 or newer): `pip install -r "
                        "requirements.txt` upgrades it\n")


def test_requirements_keep_a_supported_pytorch_and_the_exact_stack_is_pinned_apart():
    """Lower bounds in requirements.txt (no upper bound on torch, torchvision or numpy); constraints.txt pins the
    stack behind the README's figures, and those pins satisfy the bounds."""
    bounds = {line.split(">=")[0]: line.split(">=")[1] for line in (REPO / "requirements.txt").read_text().splitlines()
              if ">=" in line and not line.startswith("#")}
    assert {k: tuple(map(int, v.split("."))) for k, v in bounds.items()} == {
        k: v for k, v in utils.MINIMUM.items() if k != "Python"}
    lines = [line for line in (REPO / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in lines if "==" in line or "<" in line]
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {"torch", "torchvision", "numpy", "pillow", "cityscapesscripts"} <= pins.keys()
    for name, version in pins.items():
        if name in bounds:
            assert utils.version_problem({**utils.installed_versions(), name: version.split(",")[0]}) is None


def test_installing_the_requirements_here_replaces_nothing_of_pytorch():
    """What `pip install -r requirements.txt` would do in this environment (one with a supported PyTorch, as Colab,
    Kaggle and the lent GPU machines have): install neither torch, torchvision nor numpy."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "-r",
                        str(REPO / "requirements.txt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    planned = {item["metadata"]["name"].lower() for item in json.loads(r.stdout)["install"]}
    assert not planned & {"torch", "torchvision", "numpy"}, planned


def test_ci_runs_the_fast_suite_on_the_lower_bounds():
    pins = dict(line.split("==") for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {k: tuple(map(int, v.split(".")[:2])) for k, v in pins.items()} == {
        k: v for k, v in utils.MINIMUM.items() if k != "Python"}
    ci = (REPO / ".ci" / "run").read_text()
    assert "-r requirements.txt -c .ci/oldest.txt" in ci and '"$oldest/bin/python" -m pytest -q tests\n' in ci
    assert "python3.9" in ci and utils.MINIMUM["Python"] == (3, 9)
