"""Where and how a script runs: the device --device auto picks (and, in one line, why it leaves a GPU out), the
precision --amp auto picks for it, the loader workers a machine gets, and the Context of a run (device, precision,
processes) with the only collectives of training and evaluation."""
import contextlib
import inspect
import multiprocessing
import os
import platform
import random
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from batchnorm import SumOverRanks, sync_batchnorm
from utils import UserError, imagenet_stats, normalise

DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "off", "bf16", "fp16")
# under torchrun, how long a collective waits for a process that sends nothing (hung, or its machine gone)
# before failing; a process that ends closes its connections and is noticed at once
DIST_TIMEOUT = 600


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(cpus=None, start_method=None, local_world=None):
    """DataLoader workers per loader: the CPUs this process may use, shared among the processes torchrun starts on
    this machine, at most 8; at most 2 where workers are spawned (macOS, Windows): each is a fresh interpreter
    importing torch (about 0.3 GB of its own), phase 2 runs up to four loaders, and a laptop shares 8-16 GB with its GPU."""
    cpus = available_cpus() if cpus is None else cpus
    # the method set, or the platform's default (asking get_start_method() would fix it for the process)
    start_method = start_method or multiprocessing.get_start_method(True) or multiprocessing.get_all_start_methods()[0]
    local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(2 if start_method == "spawn" else 8, cpus // local_world))


_WARNED = set()  # the reasons pick_device has printed in this process
# the oldest NVIDIA driver each CUDA major version runs on (NVIDIA's minor-version compatibility table, Linux)
CUDA_DRIVER = {11: 450, 12: 525, 13: 580}
PYTORCH_CU126 = "https://download.pytorch.org/whl/cu126"


def device_facts(index=0):
    """What --device auto decides from, read off this machine (the tests pass their own)."""
    facts = {"system": platform.system(), "machine": platform.machine(), "torch": torch.__version__,
             "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available(),
             "mps_built": torch.backends.mps.is_built(), "mps": torch.backends.mps.is_available()}
    try:
        facts["nvidia_driver"] = driver_version(Path("/proc/driver/nvidia/version").read_text())
    except OSError:  # no NVIDIA kernel module loaded (a GPU node may still be there: the driver is 0, unknown)
        facts["nvidia_driver"] = 0 if Path("/dev/nvidia0").exists() else None
    facts["cuda_hidden"] = os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")  # hidden on purpose
    if facts["cuda"]:
        facts.update(gpu=torch.cuda.get_device_name(index), capability=torch.cuda.get_device_capability(index),
                     arch_list=torch.cuda.get_arch_list())
    if facts["system"] == "Darwin":
        facts["mac_version"] = platform.mac_ver()[0]
        try:  # 1 on Apple silicon, also for an x86_64 Python under Rosetta
            facts["apple_silicon"] = subprocess.run(["/usr/sbin/sysctl", "-n", "hw.optional.arm64"], capture_output=True,
                                                    text=True).stdout.strip() == "1"
        except OSError:
            facts["apple_silicon"] = False
    return facts


def driver_version(text):
    """The NVIDIA driver's major version from /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  535.104.05 ...", or "... UNIX Open Kernel Module for x86_64  580.65.06 ..."); 0 if it says none."""
    m = re.search(r"Kernel Module.*?\s(\d{3,})\.\d+", text)
    return int(m[1]) if m else 0


def has_kernels(capability, arch_list):
    """Whether a build with these targets (torch.cuda.get_arch_list()) runs on a GPU of this compute capability:
    a binary for the same major version and an equal or lower minor, or PTX for an equal or lower one."""
    cc = capability[0] * 10 + capability[1]
    if not any(arch.startswith(("sm_", "compute_")) for arch in arch_list):  # ROCm's gfx targets, or no list
        return True
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        number = int(re.sub(r"\D.*", "", number) or 0)  # sm_90a, sm_100f: the digits
        if kind == "sm" and number // 10 == capability[0] and number <= cc or kind == "compute" and number <= cc:
            return True
    return False


def unused_gpu(facts):
    """(device, why a GPU that is here is not used: None where nothing is left out), from device_facts()."""
    if facts["cuda"]:
        if has_kernels(facts["capability"], facts["arch_list"]):
            return "cuda", None
        major, minor = facts["capability"]
        return "cpu", (f"the {facts['gpu']} (compute capability {major}.{minor}) has no kernels in this PyTorch "
                       f"{facts['torch']} (built for {' '.join(facts['arch_list'])}); install a PyTorch built for "
                       f"an older CUDA, e.g. pip install torch torchvision --index-url {PYTORCH_CU126}")
    if facts["mps"]:
        return "mps", None
    driver, cuda = facts.get("nvidia_driver"), facts["cuda_build"]
    if driver is not None and not facts.get("cuda_hidden"):
        if cuda is None:
            return "cpu", (f"an NVIDIA GPU is here, but this PyTorch {facts['torch']} is built without CUDA; install "
                           f"one built for CUDA, e.g. pip install torch torchvision --index-url {PYTORCH_CU126}")
        need = CUDA_DRIVER.get(int(cuda.split(".")[0]), 0)
        if driver and driver < need:
            return "cpu", (f"the NVIDIA driver here is {driver}, older than the {need} that this PyTorch's CUDA {cuda} "
                           f"needs; update the driver, or install a PyTorch built for CUDA 12.6: pip install torch "
                           f"torchvision --index-url {PYTORCH_CU126}")
        return "cpu", f"an NVIDIA GPU is here, but CUDA {cuda} does not start (nvidia-smi says why)"
    if facts.get("apple_silicon"):
        if facts["machine"] != "arm64":
            return "cpu", (f"this Python is an {facts['machine']} build running under Rosetta on Apple silicon; MPS "
                           "needs an arm64 Python (python.org's installer, or Homebrew's in /opt/homebrew)")
        if facts["mac_version"] and int(facts["mac_version"].split(".")[0]) < 14:
            return "cpu", (f"MPS needs macOS 14 or newer with PyTorch 2.9 and later (this Mac runs macOS "
                           f"{facts['mac_version']}); update macOS")
        return "cpu", ("this PyTorch was built without MPS" if not facts["mps_built"] else
                       "MPS is not available to this PyTorch on this Mac")
    return "cpu", None


def pick_device(name, local_rank=0, warn=False, facts=None):
    """The torch.device --device NAME means here. auto: cuda, then mps, then the CPU, with one warning line (where
    warn, once a process) naming why a GPU that is here is not used; an unusable device asked for by name is
    refused in one line."""
    if name == "cpu":
        return torch.device("cpu")
    facts = facts or device_facts(local_rank)
    best, why = unused_gpu(facts)
    if name == "auto":
        name = best
        if why and warn and why not in _WARNED:
            _WARNED.add(why)
            print(f"warning: --device auto: {why}; running on the CPU", file=sys.stderr)
    elif name == "cuda" and best != "cuda":
        raise UserError(f"--device cuda: {why or 'no CUDA device is available here'}; or use --device cpu")
    elif name == "mps" and not facts["mps"]:
        raise UserError(f"--device mps: {why or 'Apple MPS is not available here'}; or use --device cpu")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def check_amp(amp, device):
    if amp == "fp16" and device.type not in ("cuda", "mps"):
        raise UserError(f"--amp fp16 needs a GPU, CUDA or Apple's MPS (this run is on {device.type}); use --amp bf16")


def native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """Whether the device computes bf16 in hardware; torch.cuda.is_bf16_supported() also counts emulation."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and later
    if device.type == "mps":  # M2 and later (the CPU's feature flag marks the chip generation); macOS 14 or newer
        try:
            flag = subprocess.run(["/usr/sbin/sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                  text=True).stdout
        except OSError:
            return False
        return flag.strip() == "1" and torch.backends.mps.is_macos_or_newer(14, 0)
    try:  # x86 CPUs: oneDNN runs bf16 natively with these; without them it emulates it, some 30x slower
        return bool({"avx512_bf16", "amx_bf16"} & set(Path(cpuinfo).read_text().split()))
    except OSError:
        return False


def resolve_amp(amp, device):
    """--amp as this run will use it ("auto" decided for the device), and a line that says why."""
    check_amp(amp, device)
    if amp in ("off", "fp16"):
        return amp, "as asked"
    native = native_bf16(device)  # reads /proc/cpuinfo or asks sysctl: only where the answer matters
    if amp == "bf16":
        if not native:
            print(f"warning: --amp bf16 on a {device.type} that only emulates bf16: it may be many times slower than "
                  "--amp off", file=sys.stderr)
        return amp, "as asked"
    if native:
        return "bf16", f"auto: this {device.type} computes bf16 natively"
    if device.type in ("cuda", "mps"):
        return "fp16", f"auto: this {device.type} has no native bf16; fp16 with the gradient scaler"
    return "off", "auto: this CPU only emulates bf16, fp32 is faster"


class Context:
    """Where and how this process runs: device, precision, rank, and whether it writes files. The
    collectives of training and evaluation all go through all_reduce and average_gradients."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(args.device, local_rank, warn=self.rank == 0)
        self.device_name = (f"{self.device} ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
                            else str(self.device))
        amp, why = resolve_amp(args.amp, self.device)  # args keeps what was asked: auto is decided per session
        self.set_amp(amp)
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend, timeout=timedelta(seconds=getattr(args, "dist_timeout",
                                                                                             DIST_TIMEOUT)))
        self.main = self.rank == 0
        self.acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        self.channels_last = getattr(args, "channels_last", False)
        self.stats = imagenet_stats(self.device)
        self.sync_debug = getattr(args, "sync_debug", False) and self.device.type == "cuda"
        self.sync_bn = self.world > 1 and not getattr(args, "no_sync_bn", False)
        seed = getattr(args, "seed", 0)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        self.deterministic = getattr(args, "deterministic", False)
        self.was_deterministic = torch.are_deterministic_algorithms_enabled()
        self.was_benchmark = torch.backends.cudnn.benchmark
        # inputs have one size throughout a run: let cuDNN time its algorithms once and keep the fastest
        torch.backends.cudnn.benchmark = self.device.type == "cuda" and not self.deterministic
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # on GPUs some kernels (interpolate's backward) have no deterministic version: warn, don't stop
            torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cpu")

        self.print(f"precision: {self.amp} ({why}), device {self.device_name}")

    def set_amp(self, amp):
        self.amp = amp
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def images(self, *batches):
        """uint8 N×3×H×W batches from a loader -> one normalised float batch on the device, in the run's
        memory format. Each is copied on its own (from pinned memory, without waiting) and joined there."""
        x = [b.to(self.device, non_blocking=True) for b in batches]
        x = normalise(x[0] if len(x) == 1 else torch.cat(x), self.stats)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def labels(self, y):
        return y.to(self.device, non_blocking=True).long()

    def wrap(self, model):
        """The module training runs: DDP when several processes train (gradients averaged in backward), with
        BatchNorm over the global batch unless --no-sync-bn (model's BatchNorms are replaced in place)."""
        if self.world == 1:
            return model
        if self.sync_bn:
            sync_batchnorm(model)
        # SyncBatchNorm's running statistics are equal in every process already: no broadcast at each forward
        # (PyTorch 2.13 renamed the switch; the old name still works there, with a warning)
        ddp = torch.nn.parallel.DistributedDataParallel
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else "broadcast_buffers")
        return ddp(model, device_ids=[self.device] if self.device.type == "cuda" else None, **{sync: not self.sync_bn})

    def all_reduce(self, *tensors, op="sum"):
        """Sum (or "max") each tensor in place over all processes; nothing to do in a single process."""
        if self.world > 1:
            op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
            for t in tensors:
                torch.distributed.all_reduce(t, op)

    def sum_over_ranks(self, t):
        """t summed over all processes, differentiably: the backward pass sums the gradients likewise."""
        return t if self.world == 1 else SumOverRanks.apply(t)

    def broadcast(self, *tensors):
        """Rank 0's values of each tensor, in place, in every process."""
        if self.world > 1:
            for t in tensors:
                torch.distributed.broadcast(t, 0)

    def average_gradients(self, params):
        """Average the gradients of parameters that DDP does not manage over all processes."""
        if self.world > 1:
            for p in params:
                self.all_reduce(p.grad)
                p.grad.div_(self.world)

    @contextlib.contextmanager
    def no_sync_allowed(self, enabled=True):
        """With --sync-debug on CUDA, any wait for the GPU inside the block raises: a training step must queue
        its kernels and go on."""
        on = self.sync_debug and enabled
        if on:
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if on:
                torch.cuda.set_sync_debug_mode(0)

    def print(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)

    def close(self):
        """Leave the process group, and the global switches as they were (scripts are called in-process too)."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        torch.backends.cudnn.benchmark = self.was_benchmark
        if self.deterministic:
            torch.use_deterministic_algorithms(self.was_deterministic)
