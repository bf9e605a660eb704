"""The command-line flags both training scripts share, and the data flags of every script; their checks (one
line for each mistake)."""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import datasets
import models
from engine import RESUME_MUST_MATCH
from devices import AMP_MODES, DEVICES, DIST_TIMEOUT, check_amp, default_workers, pick_device
from utils import UserError, check_fraction, check_fractions, parse_size


def add_train_args(parser, epochs, batch_size):
    """Flags both training scripts share; the defaults that differ between phases are passed in."""
    w, h = datasets.DEFAULT_SIZE
    parser.add_argument("--model", choices=models.MODELS, default="deeplab")
    parser.add_argument("--size", type=parse_size, default=datasets.DEFAULT_SIZE, metavar="WxH",
                        help=f"input width x height (default: {w}x{h}; the report's first size was 466x256)")
    parser.add_argument("--epochs", type=int, default=epochs, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="images per step and process (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--lambda-dice", type=float, default=0.3,
                        help="weight of Dice in (1 - l)·CE + l·Dice (default: %(default)s)")
    parser.add_argument("--scheduler", choices=("none", "poly"), default="none",
                        help="learning-rate schedule; poly: lr·(1 - step/steps)^0.9 (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="linear learning-rate warmup over the first N steps, times the schedule (DAFormer: 1500 "
                             "of 40k steps; default: none)")
    parser.add_argument("--train-limit", type=int, default=None, metavar="N",
                        help="train on a fixed subset of N source images (the report used 12500)")
    parser.add_argument("--hflip", action="store_true", help="random horizontal flips (off in the report)")
    parser.add_argument("--aug", action="store_true",
                        help="training images (both domains in phase 2): random scale 0.5-2 and crop back to --size, "
                             "labels alike (nearest, 255 where padded), and colour jitter (off in the report)")
    run = parser.add_argument_group("running")
    run.add_argument("--out", default=None, help="run directory (default: runs/<phase>_<model>_<W>x<H>...)")
    run.add_argument("--resume", nargs="?", const="last", default=None, metavar="PATH",
                     help="continue from PATH, or with no PATH from OUT/last.pt (a fresh start if there is none)")
    run.add_argument("--session-epochs", type=int, default=None, metavar="N",
                     help="stop after N epochs in this invocation (checkpoint saved, exit 0); go on with --resume")
    run.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                     help="also save OUT/last.pt every N steps, so a killed run loses at most N steps "
                          "(default: at the end of each epoch only)")
    run.add_argument("--device", choices=DEVICES, default="auto",
                     help="auto: cuda, then mps, then cpu (default: %(default)s)")
    run.add_argument("--amp", choices=AMP_MODES, default="auto",
                     help="mixed precision. auto: bf16 where the device computes it natively (CUDA compute "
                          "capability 8.0+, M2+ Macs, CPUs with AVX512-BF16 or AMX), else fp16 with a gradient scaler "
                          "on a GPU, else off (fp32); decided again in each session, for its device (default: "
                          "%(default)s)")
    run.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster convolutions)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model for training (slow first steps, then faster ones; falls back to "
                          "eager with a warning where this machine cannot compile)")
    run.add_argument("--sync-debug", action="store_true",
                     help="CUDA: stop with an error where a training step waits for the GPU (a check for methods "
                          "added to the loop: steps should only queue work)")
    run.add_argument("--log-every", type=int, default=50, metavar="N",
                     help="read the running losses back from the device every N steps; non-finite losses and "
                          "stop signals are acted on there, and before every save; without a terminal, a progress "
                          "line is printed there (and at least every 30 s) (default: %(default)s)")
    run.add_argument("--no-sync-bn", action="store_true",
                     help="under torchrun, BatchNorm over each process's own images, not the global batch")
    add_dist_timeout(run)
    run.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels: on CPU, sessions and straight runs give identical weights")


def add_dist_timeout(parser):
    parser.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT, metavar="SECONDS",
                        help="under torchrun, how long the processes wait for one that sends nothing (hung, or its "
                             "machine gone) before the others stop, one line each; one that ends is noticed at once. "
                             "Must exceed what one process does alone: building the cache, writing a checkpoint "
                             "(default: %(default)s)")


def check_dist_timeout(args):
    if not 0 < args.dist_timeout < float("inf"):
        raise UserError(f"--dist-timeout {args.dist_timeout}: must be a number of seconds above 0")


def check_train_args(args):
    check_dist_timeout(args)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size}: BatchNorm needs at least 2 images per step")
    if not 0 < args.lr < float("inf"):
        raise UserError(f"--lr {args.lr}: must be a positive number")
    check_fractions(args, "lambda_dice")
    if args.session_epochs is not None and args.session_epochs < 1:
        raise UserError(f"--session-epochs {args.session_epochs}: must be at least 1")
    if args.train_limit is not None and args.train_limit < 1:
        raise UserError(f"--train-limit {args.train_limit}: must be at least 1")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: a number of steps, 0 (no warmup) or more")
    if args.log_every < 1:
        raise UserError(f"--log-every {args.log_every}: must be at least 1")
    if args.save_every_steps < 0:
        raise UserError(f"--save-every-steps {args.save_every_steps}: must be 0 (epoch ends only) or more")
    if args.resume not in (None, "last") and not Path(args.resume).exists():
        raise UserError(f"--resume {args.resume}: no such checkpoint (plain --resume takes OUT/last.pt)")
    # an unavailable device is refused before anything else happens (and a GPU left out says why, once)
    check_amp(args.amp, pick_device(args.device, warn=int(os.environ.get("RANK", 0)) == 0))


# ----------------------------------------------------------------------------- settings declared once

# the checks a declared setting names: each takes the flag and its value, and says what is wrong in one line
def weight(flag, value):
    """A loss weight: a finite number, 0 or more."""
    if not 0 <= value < float("inf"):
        raise UserError(f"{flag} {value}: must be a number, 0 or more")


fraction = check_fraction  # a share or a probability, in [0, 1]


def decay(flag, value):
    if not 0 <= value < 1:
        raise UserError(f"{flag} {value}: a moving average's decay must be in [0, 1) (at 1 it would never move)")


def positive(flag, value):
    if not 0 < value < float("inf"):
        raise UserError(f"{flag} {value}: must be a number above 0")


@dataclass
class Setting:
    flag: str  # as typed: --dacs-ema
    dest: str  # as args holds it: dacs_ema
    default: object
    check: Optional[Callable] = None  # check(flag, value), for a value that is not None
    token: Optional[str] = None  # in the default folder name: _<token><value> (default: the flag without --)


class Methods:
    """Phase 2's adaptation methods, each declared once as an argparse group: its first setting switches it on
    (any value but 0, None or False), the others tune it; and the phase's other settings (setting()). What depends
    on them reads these declarations: the default folder name (every setting off its default), the settings a
    resume must match (every switch and plain setting, the others of a method that is on), the checks of their
    values, and the words that name a run (its first line, the benchmark's rows).

        mmd = methods.method("MMD")
        mmd("--lam", type=float, default=0.01, check=flags.weight, help="...")
    """

    def __init__(self, parser):
        self.parser, self.groups, self.settings = parser, {}, []  # title -> [Setting], the switch first; all in order

    def method(self, title, description=None):
        group, settings = self.parser.add_argument_group(title, description), []
        self.groups[title] = settings
        return lambda flag, **kwargs: settings.append(self.declare(group, flag, **kwargs))

    def setting(self, flag, **kwargs):
        """A setting of the phase that is no method (always matched on resume, never described)."""
        self.declare(self.parser, flag, **kwargs)

    def declare(self, where, flag, check=None, token=None, **kwargs):
        """The argparse flag, in where (a group or the parser), and its Setting, kept in declaration order."""
        action = where.add_argument(flag, **kwargs)
        self.settings.append(Setting(flag, action.dest, action.default, check, token))
        return self.settings[-1]

    def on(self, args):
        """{title: settings} of the methods args switches on."""
        return {t: s for t, s in self.groups.items() if getattr(args, s[0].dest) not in (0, None, False)}

    def check(self, args):
        for s in self.settings:
            if s.check and getattr(args, s.dest) is not None:
                s.check(s.flag, getattr(args, s.dest))

    def resume_keys(self, args):
        off = [s.dest for t, settings in self.groups.items() if t not in self.on(args) for s in settings[1:]]
        return tuple(s.dest for s in self.settings if s.dest not in off)

    def describe(self, args):
        """'MMD (--lam 0.05 --multilevel), DACS self-training (--dacs 1)': the methods on, each with its switch and
        the settings off their defaults."""
        return ", ".join(f"{title} (" + " ".join(
            s.flag + ("" if getattr(args, s.dest) is True else " " + text(getattr(args, s.dest), " "))
            for i, s in enumerate(settings) if i == 0 or getattr(args, s.dest) != s.default) + ")"
            for title, settings in self.on(args).items())


def default_out(args, prefix, parser, methods=None, named=("size",)):
    """prefix, then '_<token><value>' ('_<token>' for a switch) for each setting off its default that prefix does not
    name: the methods' in declaration order, then the training settings a resume must match. Two runs that differ in
    any of them get folders of their own."""
    settings = list(methods.settings) if methods else []
    settings += [Setting("--" + k.replace("_", "-"), k, parser.get_default(k)) for k in RESUME_MUST_MATCH]
    return prefix + "".join(f"_{s.token or s.flag[2:]}{'' if value is True else text(value, '-')}" for s in settings
                            if s.dest not in named and (value := getattr(args, s.dest)) != s.default)


class Removed(argparse.Action):
    """A flag that is gone: naming it is one line saying what replaced it (const)."""

    def __init__(self, option_strings, dest, const=None, **kwargs):
        super().__init__(option_strings, dest, nargs="*", const=const, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{option_string} was removed: {self.const}")


def text(value, sep):
    """A setting's value as typed: numbers by %g, lists joined by sep."""
    if isinstance(value, (list, tuple)):
        return sep.join(text(v, sep) for v in value)
    return format(value, "g") if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- the data flags of every script

def non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, 0 or more")
    return value


def add_data_args(parser):
    """The data flags every training and evaluation script takes."""
    g = parser.add_argument_group("data")
    g.add_argument("--gta5-root", default="data/gta5", help="GTA-V root holding images/ and labels/ (default: %(default)s)")
    g.add_argument("--cityscapes-root", default="data/cityscapes",
                   help="Cityscapes root holding leftImg8bit/ and gtFine/ (default: %(default)s)")
    g.add_argument("--toy", action="store_true",
                   help=f"use the built-in synthetic pair in {datasets.TOY_ROOT} (made on first use) instead of the roots")
    g.add_argument("--split-scheme", choices=("seed", "official"), default="seed",
                   help="seed: the report's seeded 60/10/30 split of each dataset; official: GTA-V's split.mat and "
                        "Cityscapes' train/val folders (default: %(default)s)")
    g.add_argument("--workers", type=non_negative, default=default_workers(),
                   help="DataLoader worker processes per loader, kept alive across epochs in training (default: the "
                        "CPUs available to each process, at most 8, at most 2 on macOS: %(default)s here)")
    g.add_argument("--cache", action="store_true",
                   help="decode and resize the images once into uint8 memmaps under each data root's .cache/ "
                        "(rebuilt when the files or --size change), then read those: much faster epochs")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep the --cache in DIR instead of the data roots (implies --cache): a local disk when the "
                        "data is on slow or read-only storage such as Google Drive")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out images without labels (and the reverse) with a warning listing them; in "
                        "training, also replace an unreadable or wrongly encoded file by the next image")
    return g


def cache_arg(args):
    """What the datasets' cache= takes: False, True (ROOT/.cache) or the --cache-dir folder."""
    return Path(args.cache_dir) if args.cache_dir else args.cache
