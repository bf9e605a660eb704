"""Shared helpers: user-facing errors, atomic writes, argument parsing, and the mIoU metric."""
import os
import sys
import tempfile

import torch


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value): shown as one line, no traceback."""


def run_main(main):
    """Call main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def atomic_write(path, write_fn, mode="wb"):
    """Write through a temp file in the same folder, then rename: readers see the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_size(text):
    """'480x256' -> (480, 256); W×H as everywhere in this project."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 480x256") from None
    if w < 32 or h < 32:
        raise UserError(f"--size {text!r}: width and height must be at least 32 pixels")
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
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "it may be truncated: use another one") from None
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
        h = self.mat.double()
        tp = h.diag()
        iou = tp / (h.sum(0) + h.sum(1) - tp)  # 0/0 -> NaN: a class absent from both is left out of the mean
        acc = (tp.sum() / h.sum()).item() if h.sum() > 0 else float("nan")
        return iou, torch.nanmean(iou).item(), acc
