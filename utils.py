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
