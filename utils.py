"""Small helpers every script shares: user-facing errors, the mIoU metric, splits, seeds and RNG state, and
the Context (device, precision, processes) with the only collectives of a run."""
import argparse
import contextlib
import hashlib
import importlib.metadata
import inspect
import multiprocessing
import os
import platform
import random
import re
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

# the oldest versions the test suite passes on (CI runs it there too; torch 2.7 fails it); older ones fail in
# ways that say nothing
MINIMUM = {"Python": (3, 9), "torch": (2, 8), "torchvision": (0, 23), "numpy": (1, 26)}


def installed_versions():
    try:
        vision = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        vision = None
    return {"Python": platform.python_version(), "torch": torch.__version__, "torchvision": vision,
            "numpy": np.__version__}


def version_problem(found):
    """One line naming the first package older than MINIMUM (or missing) in found {name: version}; None if none."""
    for name, oldest in MINIMUM.items():
        want = ".".join(map(str, oldest))
        if found.get(name) is None:
            return f"{name} is not installed; `pip install -r requirements.txt` installs it"
        m = re.match(r"(\d+)\.(\d+)", found[name])
        if m and (int(m[1]), int(m[2])) < oldest:
            fix = "use a newer Python" if name == "Python" else "`pip install -r requirements.txt` upgrades it"
            return f"{name} {found[name]} is older than this project supports ({want} or newer): {fix}"
    return None


_too_old = version_problem(installed_versions())
if _too_old:  # before anything of this project fails on an API these versions lack
    print(f"error: {_too_old}", file=sys.stderr)
    sys.exit(2)

from batchnorm import SumOverRanks, sync_batchnorm  # noqa: E402 (after the version check)

NUM_CLASSES = 19  # the Cityscapes train classes, trainIds 0..18
IGNORE = 255  # the label of every pixel that losses and metrics leave out
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics the backbones were pretrained with
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "off", "bf16", "fp16")
# under torchrun, how long a collective waits for a process that sends nothing (hung, or its machine gone)
# before failing; a process that ends closes its connections and is noticed at once
DIST_TIMEOUT = 600


# ----------------------------------------------------------------------------- user mistakes

class UserError(Exception):
    """A mistake the user can fix (bad path, bad value): shown as one line, no traceback."""


def user_message(error):
    """The one line of a UserError, also when a DataLoader worker raised it (its text then embeds the
    worker's traceback, whose last line is the original message)."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text


def run_main(main):
    """Call main(); a UserError becomes one line on stderr and exit status 2. Under torchrun, a collective that
    failed because another process is gone (it ended, or hung past --dist-timeout) becomes one line too, exit
    status 1: torchrun's own report names the rank that failed."""
    try:
        return main()
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and _is_communication_failure(e)):
            raise
        print(f"error: rank {torch.distributed.get_rank()} lost contact with another process of the run "
              f"({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__}); torchrun's "
              "report names the one that failed. A training run continues with --resume", file=sys.stderr)
        sys.exit(1)


def _is_communication_failure(error):
    """A collective that failed because a peer is gone: its connection closed, or nothing came for the timeout.
    Other errors (a CUDA error inside NCCL, out of memory) keep their traceback."""
    text = str(error)
    return (isinstance(error, torch.distributed.DistNetworkError) or "Connection reset" in text
            or "Connection closed" in text or "Timed out" in text or "timed out" in text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError: one line, like every other user mistake."""

    def error(self, message):
        raise UserError(message)


def parse_size(text):
    """'480x256' -> (480, 256); W×H as everywhere in this project."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 480x256") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be at least 32 pixels")
    return w, h


def imagenet_stats(device):
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalise(x, stats=None):
    """uint8 N×3×H×W (0..255) -> float32 ImageNet-normalised, on x's device. stats: imagenet_stats(x.device),
    made once by the caller (made here, they would be copied to the GPU, and wait for it, at each call)."""
    mean, std = stats or imagenet_stats(x.device)
    return (x.float().div_(255) - mean) / std


# ----------------------------------------------------------------------------- the metric

class ConfusionMatrix:
    """Rows: ground truth, columns: prediction, accumulated over a whole split (never averaged per batch)."""

    def __init__(self, num_classes=NUM_CLASSES, device="cpu", ignore_index=IGNORE):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, target, pred):
        n = self.num_classes
        target, pred = target.reshape(-1).to(self.mat.device).long(), pred.reshape(-1).to(self.mat.device).long()
        keep = (target != self.ignore_index) & (target >= 0) & (target < n)
        # pixels left out are counted in one extra bin, dropped afterwards: a fixed shape, so no read-back to
        # the host (boolean indexing and CUDA's bincount both wait for the GPU)
        idx = torch.where(keep, target * n + pred, n * n)
        counts = torch.zeros(n * n + 1, dtype=torch.int64, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
        self.mat += counts[:-1].view(n, n)

    def compute(self):
        """(per-class IoU as a float64 tensor, NaN where a class is in neither, mIoU, pixel accuracy)."""
        h = self.mat.cpu().double()  # on the CPU: MPS has no float64
        tp = h.diag()
        iou = tp / (h.sum(0) + h.sum(1) - tp)  # 0/0 -> NaN: a class absent from both is left out of the mean
        acc = (tp.sum() / h.sum()).item() if h.sum() > 0 else float("nan")
        return iou, torch.nanmean(iou).item(), acc


# ----------------------------------------------------------------------------- splits and seeds

def seeded_split(keys, split, seed=0, fractions=(0.6, 0.1)):
    """The report's 60/10/30 split: order by a hash of (seed, key), so it is the same on every machine."""
    order = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}/{k}".encode()).hexdigest())
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return parts[split]


def take_limit(keys, limit, seed=0):
    """A fixed subset of `limit` keys (the report trained on 12,500 GTA-V images)."""
    if limit is None or limit >= len(keys):
        return list(keys)
    return sorted(keys, key=lambda k: hashlib.sha256(f"limit/{seed}/{k}".encode()).hexdigest())[:limit]


def hash_seed(*parts):
    """A 63-bit seed from several values, stable across runs and machines."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def get_rng_state(device):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"])
    np.random.set_state((state["numpy"][0], state["numpy"][1].numpy(), *state["numpy"][2:]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------- where a script runs

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


def check_fraction(flag, value):
    """A share or a probability: in [0, 1]; one line naming the flag otherwise."""
    if not 0 <= value <= 1:
        raise UserError(f"{flag} {value}: must be between 0 and 1")


def check_fractions(args, *names):
    for name in names:
        check_fraction("--" + name.replace("_", "-"), getattr(args, name))


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


class StopRequested:
    """Within `with StopRequested() as stop`, SIGINT / SIGTERM set stop.signal; the loop saves and leaves at
    the next step boundary. A second signal is not waited for: it ends the process at once (a stuck loader
    must stay interruptible). The previous handlers come back on leaving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._set) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _set(self, signum, frame):
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum
