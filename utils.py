"""Small helpers every script shares: the versions it needs (checked first), user-facing errors, the mIoU
metric, splits, seeds and RNG state, and stop signals. Where a run goes (device, precision, processes): devices.py."""
import argparse
import hashlib
import importlib.metadata
import os
import platform
import random
import re
import signal
import sys

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

NUM_CLASSES = 19  # the Cityscapes train classes, trainIds 0..18
IGNORE = 255  # the label of every pixel that losses and metrics leave out
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics the backbones were pretrained with
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


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


def check_fraction(flag, value):
    """A share or a probability: in [0, 1]; one line naming the flag otherwise."""
    if not 0 <= value <= 1:
        raise UserError(f"{flag} {value}: must be between 0 and 1")


def check_fractions(args, *names):
    for name in names:
        check_fraction("--" + name.replace("_", "-"), getattr(args, name))


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
