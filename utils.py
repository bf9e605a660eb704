"""Shared helpers: user-facing errors, atomic writes, argument parsing, and the mIoU metric."""
import argparse
import csv
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


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
    """Call main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def atomic_write(path, write_fn, mode="wb"):
    """Write through a temp file in the same folder, then rename: readers see the old file or the new one.
    A failed write (folder not writable, disk full) is a UserError; the old file stays as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; the result should look like any other output
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: could not be written ({e.strerror or e}); any previous version is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


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


def read_checkpoint(path):
    """torch.load with weights_only=True (nothing in the file can run code), each failure in one line."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: checkpoint not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: checkpoint is empty (an interrupted copy?); use another one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path}: checkpoint holds pickled code or objects, which are never loaded; "
                            "use a checkpoint written by this project") from None
        reason = str(e).splitlines()[0].split(". ")[0][:100]
        raise UserError(f"{path}: not a readable checkpoint ({reason}); it may be truncated: use another one") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project (no 'model' entry)")
    return ckpt


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction, accumulated over a whole split (never averaged per batch)."""

    def __init__(self, num_classes=19, device="cpu", ignore_index=255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, target, pred):
        target, pred = target.reshape(-1).to(self.mat.device), pred.reshape(-1).to(self.mat.device)
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        idx = target[keep] * self.num_classes + pred[keep]
        self.mat += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def all_reduce(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def compute(self):
        """(per-class IoU as a float64 tensor, NaN where a class is in neither, mIoU, pixel accuracy)."""
        h = self.mat.cpu().double()  # on the CPU: MPS has no float64
        tp = h.diag()
        iou = tp / (h.sum(0) + h.sum(1) - tp)  # 0/0 -> NaN: a class absent from both is left out of the mean
        acc = (tp.sum() / h.sum()).item() if h.sum() > 0 else float("nan")
        return iou, torch.nanmean(iou).item(), acc


# ----------------------------------------------------------------------------- the training loop


class ShardSampler(torch.utils.data.Sampler):
    """A seeded order per epoch, shared between processes, that can start part way (mid-epoch resume).

    Each of `world` processes takes `per_rank` indices; when that is more than the data holds (phase 2's
    target stream following the source), further seeded permutations are appended.
    """

    def __init__(self, n, seed=0, rank=0, world=1, per_rank=None, salt=0):
        self.n, self.seed, self.rank, self.world, self.salt = n, seed, rank, world, salt
        self.per_rank = per_rank if per_rank is not None else n // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order, cycle = [], 0
        while len(order) < self.per_rank * self.world:
            g = torch.Generator().manual_seed(hash_seed(self.seed, self.salt, self.epoch, cycle))
            order += torch.randperm(self.n, generator=g).tolist()
            cycle += 1
        mine = order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return iter(mine[self.start:])

    def __len__(self):
        return self.per_rank - self.start


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


def add_train_args(parser, epochs, batch_size):
    """Flags both training scripts share; the defaults that differ between phases are passed in."""
    parser.add_argument("--model", choices=("unet", "deeplab"), default="deeplab")
    parser.add_argument("--size", type=parse_size, default=(480, 256), metavar="WxH",
                        help="input width x height (default: 480x256; the report's first size was 466x256)")
    parser.add_argument("--epochs", type=int, default=epochs, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="images per step and process (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--lambda-dice", type=float, default=0.3,
                        help="weight of Dice in (1 - l)·CE + l·Dice (default: %(default)s)")
    parser.add_argument("--scheduler", choices=("none", "poly"), default="none",
                        help="learning-rate schedule; poly: lr·(1 - step/steps)^0.9 (default: %(default)s)")
    parser.add_argument("--train-limit", type=int, default=None, metavar="N",
                        help="train on a fixed subset of N source images (the report used 12500)")
    parser.add_argument("--hflip", action="store_true", help="random horizontal flips (off in the report)")
    run = parser.add_argument_group("running")
    run.add_argument("--out", default=None, help="run directory (default: runs/<phase>_<model>_<W>x<H>...)")
    run.add_argument("--resume", nargs="?", const="last", default=None, metavar="PATH",
                     help="continue from PATH, or with no PATH from OUT/last.pt (a fresh start if there is none)")
    run.add_argument("--session-epochs", type=int, default=None, metavar="N",
                     help="stop after N epochs in this invocation (checkpoint saved, exit 0); go on with --resume")
    run.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                     help="also save OUT/last.pt every N steps, so a killed run loses at most N steps "
                          "(default: at the end of each epoch only)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                     help="auto: cuda, then mps, then cpu (default: %(default)s)")
    run.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                     help="mixed precision: bf16 on CPU, CUDA and MPS; fp16 (with a gradient scaler) on CUDA "
                          "(default: %(default)s)")
    run.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster convolutions)")
    run.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels: on CPU, sessions and straight runs give identical weights")


def check_train_args(args):
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size}: BatchNorm needs at least 2 images per step")
    if not 0 < args.lr < float("inf"):
        raise UserError(f"--lr {args.lr}: must be a positive number")
    if not 0 <= args.lambda_dice <= 1:
        raise UserError(f"--lambda-dice {args.lambda_dice}: must be between 0 and 1")
    if args.session_epochs is not None and args.session_epochs < 1:
        raise UserError(f"--session-epochs {args.session_epochs}: must be at least 1")
    if args.train_limit is not None and args.train_limit < 1:
        raise UserError(f"--train-limit {args.train_limit}: must be at least 1")
    if args.save_every_steps < 0:
        raise UserError(f"--save-every-steps {args.save_every_steps}: must be 0 (epoch ends only) or more")
    if args.resume not in (None, "last") and not Path(args.resume).exists():
        raise UserError(f"--resume {args.resume}: no such checkpoint (plain --resume takes OUT/last.pt)")
    device = pick_device(args.device)  # an unavailable device is refused before anything else happens
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs CUDA (this run is on {device.type}); use --amp bf16")


def ensure_writable(folder):
    """Create the run directory and prove it takes files, before any work is spent."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror}); choose another --out") from None


def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


class Context:
    """Where and how this process runs: device, precision, rank, and whether it writes files."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(args.device, local_rank)
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend)
        self.main = self.rank == 0
        self.acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        if args.amp == "fp16" and self.device.type != "cuda":
            raise UserError(f"--amp fp16 needs CUDA (this run is on {self.device.type}); use --amp bf16")
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.channels_last = getattr(args, "channels_last", False)
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
        seed = getattr(args, "seed", 0)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        if getattr(args, "deterministic", False):
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # on GPUs some kernels (interpolate's backward) have no deterministic version: warn, don't stop
            torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cpu")
            torch.backends.cudnn.benchmark = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def to_device(self, x):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def print(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)

    def close(self):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _quiet_worker(_):
    # Ctrl-C reaches the whole process group: the main process saves, then stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, ctx, batch_size, workers, seed=0, train=True, per_rank=None, salt=0):
    """Training: a ShardSampler, full batches only. Evaluation: every image exactly once across processes."""
    if train:
        sampler = ShardSampler(len(dataset), seed, ctx.rank, ctx.world, per_rank, salt)
    else:
        sampler = list(range(ctx.rank, len(dataset), ctx.world))
        dataset.skip_bad = False  # a stand-in image would be scored twice: only unpaired files may be left out
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_quiet_worker)


@torch.no_grad()
def evaluate(model, loader, ctx, criterion=None, num_classes=19, tta=False, on_prediction=None):
    """One pass over a split, all processes together -> {miou, pixel_acc, iou (per class), loss, images}.

    Logits are upsampled (bilinear) to the label's size when it differs: full-resolution evaluation.
    tta: average the logits with those of the horizontally flipped image. on_prediction(indices, pred)
    receives each batch's dataset indices and predicted trainIds.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ctx.device)
    sums = torch.zeros(2, dtype=ctx.acc_dtype, device=ctx.device)  # loss × images, images
    order, seen = list(loader.sampler), 0
    for x, y in loader:
        x, y = ctx.to_device(x), y.to(ctx.device, non_blocking=True)
        with ctx.autocast():
            logits = model(x)
            if tta:
                logits = (logits + model(x.flip(-1)).flip(-1)) / 2
        logits = logits.float()
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        if criterion is not None:
            sums[0] += criterion(logits, y).to(ctx.acc_dtype) * len(x)
        sums[1] += len(x)
        pred = logits.argmax(1)
        cm.update(y, pred)
        if on_prediction is not None:
            on_prediction(order[seen:seen + len(x)], pred)
        seen += len(x)
    cm.all_reduce()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    iou, miou, acc = cm.compute()
    loss = (sums[0] / sums[1]).item() if criterion is not None and sums[1] > 0 else float("nan")
    return {"miou": miou, "pixel_acc": acc, "iou": iou.tolist(), "loss": loss, "images": int(sums[1].item())}


def save_checkpoint(path, state):
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except RuntimeError as e:  # torch.save reports a full disk as "PytorchStreamWriter failed writing file"
        raise UserError(f"{path}: could not be written ({str(e).splitlines()[0][:100]}); the previous "
                        "checkpoint is intact: free some space and --resume") from None


def write_metrics(path, history):
    columns = list(dict.fromkeys(k for row in history for k in row))

    def write(f):
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(history)
    atomic_write(path, write, mode="w")


class StopRequested:
    """SIGINT / SIGTERM set a flag; the loop saves and leaves at the next step boundary. A second signal
    is not waited for: it ends the process at once (a stuck loader must stay interruptible)."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum


# what a resumed run must share with the run it continues (--epochs too under the poly schedule)
RESUME_MUST_MATCH = ("size", "batch_size", "lr", "lambda_dice", "scheduler", "train_limit", "hflip", "seed",
                     "split_scheme", "train_on", "lam", "multilevel", "sigma")


def plain_args(args):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def resumable_checkpoint(path, args, phase, config):
    """The checkpoint at path, if it continues this very run (same phase, model and settings)."""
    ckpt = read_checkpoint(path)
    scripts = {"seg": "train_seg.py", "mmd": "train_mmd.py"}
    if ckpt.get("phase") != phase:
        raise UserError(f"{path}: was written by {scripts.get(ckpt.get('phase'), 'something else')}; --resume "
                        f"continues a {scripts[phase]} run" + (" (a phase-1 checkpoint goes to --init)" if phase == "mmd"
                                                               else ""))
    if ckpt.get("config") != config:
        got = ckpt.get("config", {})
        raise UserError(f"{path}: is a {got.get('model')}/{got.get('backbone')} checkpoint, not "
                        f"{config['model']}/{config['backbone']}; resume with the same --model and --backbone")
    saved, now = ckpt.get("args", {}), plain_args(args)
    keys = RESUME_MUST_MATCH + (("epochs",) if args.scheduler == "poly" else ())
    differ = [k for k in keys if k in saved and k in now and saved[k] != now[k]]
    if differ:
        raise UserError(f"{path}: that run used " + ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in differ)
                        + "; resume with the same values, or start another --out")
    return ckpt


def fit(ctx, args, model, step, loaders, validate, phase, config, best, optimizer, validate_first=False):
    """The training loop of both phases.

    step(model, batches, train_cm) -> (loss, {column: value}) computes one step's loss (under autocast);
    loaders are zipped step by step (phase 1: [source]; phase 2: [source, target]); validate(model) ->
    {column: value} runs after each epoch (and, with validate_first, once before training as epoch 0, which
    is recorded but never chosen as best); best maps a file name to the column whose maximum it keeps.
    One row per epoch goes to OUT/metrics.csv; OUT/last.pt holds everything needed to continue.
    """
    out = Path(args.out)
    steps_per_epoch = len(loaders[0].sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(loaders[0].dataset)} training images are fewer than one batch of "
                        f"{args.batch_size} per process; lower --batch-size")
    total = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda i: max(0.0, 1 - i / total) ** 0.9) if args.scheduler == "poly" else (lambda i: 1.0))
    state = {"epoch": 0, "step": 0, "best": {}, "history": [], "partial": None}
    if args.resume:
        path = out / "last.pt" if args.resume == "last" else Path(args.resume)
        if args.resume == "last" and not path.exists():
            ctx.print(f"no checkpoint at {path}: starting from scratch")
        else:
            ckpt = resumable_checkpoint(path, args, phase, config)
            if ckpt["partial"] is not None and ckpt.get("world", 1) != ctx.world:
                raise UserError(f"{path}: was saved mid-epoch by {ckpt.get('world', 1)} process(es); resume it with "
                                f"as many (this run has {ctx.world}), or from an epoch-end checkpoint")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ctx.scaler.is_enabled() and ckpt["scaler"]:  # a run may switch --amp between sessions
                ctx.scaler.load_state_dict(ckpt["scaler"])
            state = {k: ckpt[k] for k in state}
            set_rng_state(ckpt["rng"], ctx.device)
            ctx.print(f"resumed from {path}: epoch {state['epoch']}, step {state['step']}")
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "args.json", lambda f: f.write(json.dumps(
            {"argv": sys.argv, "args": {k: v for k, v in vars(args).items()}}, indent=1, default=str)), mode="w")
    net = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)

    def checkpoint():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": ctx.scaler.state_dict(), "rng": get_rng_state(ctx.device), "phase": phase, "config": config,
                "args": plain_args(args), "world": ctx.world, **state}

    if validate_first and not state["history"]:
        row = {"epoch": 0, **validate(model)}
        state["history"].append(row)
        ctx.print("epoch 0 (before training): " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
    stop = StopRequested()
    best_first = next(iter(best))
    from tqdm import tqdm
    quiet = not (ctx.main and sys.stderr.isatty())
    epochs_run = 0
    while state["epoch"] < args.epochs:
        if args.session_epochs is not None and epochs_run >= args.session_epochs:
            ctx.print(f"session done after {epochs_run} epochs ({state['epoch']}/{args.epochs}); "
                      f"continue with --resume")
            return state
        epoch = state["epoch"]
        # a mid-epoch checkpoint holds the sums of all processes: rank 0 takes them back, the others start at 0
        partial = state["partial"] or {"sums": {}, "train_cm": None, "seconds": 0.0}
        share = 1 if ctx.main else 0
        train_cm = ConfusionMatrix(device=ctx.device)
        if partial["train_cm"] is not None:
            train_cm.mat += partial["train_cm"].to(ctx.device) * share
        sums = {k: torch.tensor(v * share, dtype=ctx.acc_dtype, device=ctx.device) for k, v in partial["sums"].items()}
        for i, loader in enumerate(loaders):
            loader.dataset.flip_seed = hash_seed(args.seed, "flip", i, epoch)
            loader.sampler.set_epoch(epoch, state["step"] * args.batch_size)
            loader.generator.manual_seed(hash_seed(args.seed, "workers", i, epoch, state["step"]))
        net.train()
        started = time.time() - partial["seconds"]

        def save_partial():
            total = {k: v.clone() for k, v in sums.items()}
            cm = train_cm.mat.clone()
            if ctx.world > 1:
                for t in (*total.values(), cm):
                    torch.distributed.all_reduce(t)
            state["partial"] = {"sums": {k: v.item() for k, v in total.items()}, "train_cm": cm.cpu(),
                                "seconds": time.time() - started}
            if ctx.main:
                save_checkpoint(out / "last.pt", checkpoint())

        bar = tqdm(zip(*loaders), total=steps_per_epoch, initial=state["step"], desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=quiet, leave=False, dynamic_ncols=True)
        def halt(signum):
            save_partial()
            ctx.print(f"stopped by signal {signum} at epoch {epoch + 1}, step {state['step']}; "
                      f"saved {out / 'last.pt'}: continue with --resume")
            ctx.close()
            sys.exit(128 + signum)

        batch_iter = iter(bar)
        while True:
            try:
                batches = next(batch_iter)
            except StopIteration:
                break
            except RuntimeError:  # DataLoader workers killed by a signal sent to the whole process group
                if stop.signal is None:
                    raise
                halt(stop.signal)
            with ctx.autocast():
                loss, logs = step(net, batches, train_cm)
            finite = torch.isfinite(loss.detach()).float()
            if ctx.world > 1:  # all processes stop together, or the others would wait in backward forever
                torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN)
            if not finite.item():
                terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in logs.items())
                raise UserError(f"loss is not finite at epoch {epoch + 1}, step {state['step'] + 1} ({terms}); "
                                f"{out / 'last.pt'} was left as it was; lower --lr or --lam and start again "
                                f"(another --out), e.g. from {out / best_first} with --init or --weights")
            optimizer.zero_grad(set_to_none=True)
            ctx.scaler.scale(loss).backward()
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
            scheduler.step()
            for k, v in logs.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=ctx.acc_dtype, device=ctx.device)) + v.detach().to(ctx.acc_dtype)
            state["step"] += 1
            stopping = torch.tensor(float(stop.signal or 0), device=ctx.device)
            if ctx.world > 1:  # every process stops at the same step, whichever got the signal first
                torch.distributed.all_reduce(stopping, torch.distributed.ReduceOp.MAX)
            if stopping.item():
                halt(int(stopping.item()))
            if args.save_every_steps and state["step"] % args.save_every_steps == 0 and state["step"] < steps_per_epoch:
                save_partial()
        bar.close()
        train_seconds = time.time() - started
        train_cm.all_reduce()
        row = {"epoch": epoch + 1}
        for k, v in sums.items():
            if ctx.world > 1:
                torch.distributed.all_reduce(v)
            row[k] = v.item() / (steps_per_epoch * ctx.world)
        row["train_miou"] = train_cm.compute()[1]
        row.update(validate(model))
        row["train_seconds"] = round(train_seconds, 2)
        row["seconds"] = round(time.time() - started, 2)
        row["lr"] = optimizer.param_groups[0]["lr"]
        state.update(epoch=epoch + 1, step=0, partial=None)
        state["history"].append(row)
        improved = [name for name, key in best.items() if row[key] > state["best"].get(key, -1.0)]
        for name in improved:
            state["best"][best[name]] = row[best[name]]
        if ctx.main:  # best files before last.pt: a kill in between replays the epoch and writes them again
            ckpt = checkpoint()
            for name in improved:
                save_checkpoint(out / name, ckpt)
            save_checkpoint(out / "last.pt", ckpt)
            write_metrics(out / "metrics.csv", state["history"])
        ctx.print("epoch {epoch}: ".format(**row) + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr") and isinstance(v, float))
            + (f"  (new best: {', '.join(improved)})" if improved else ""))
        epochs_run += 1
    return state
