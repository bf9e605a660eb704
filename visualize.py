"""Pictures and tables of results.

    python visualize.py predict --checkpoint runs/seg_deeplab_480x256/best.pt --dataset cityscapes -n 4
    python visualize.py compare --checkpoints runs/seg_unet_480x256/best.pt runs/seg_deeplab_480x256/best.pt
    python visualize.py curves runs/mmd_deeplab_480x256_lam0.01_ml       # loss and mIoU per epoch
    python visualize.py legend                                            # the 19 classes and their colours
    python visualize.py table runs/mmd_deeplab_480x256_lam*               # the report's Tables 4-8

Uncertainty mask (report 4.1, with the sign fixed): per pixel the entropy H = -Σ p log p of the softmax,
divided by log 19 so that 0 means certain and 1 means uniform over the 19 classes; a pixel is blacked
out when H is above --entropy-threshold or its top probability is below --confidence-threshold.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import datasets
import flags
import models
from engine import TEXT_COLUMNS
from losses import uncertainty_mask
from files import atomic_write
from devices import DEVICES, Context
from utils import ArgumentParser, UserError, check_fractions, parse_size, run_main

VOID = np.array([0, 0, 0], np.uint8)


def colourise(train_ids):
    """trainIds -> RGB in the Cityscapes palette (from cityscapesscripts); 255 and anything else black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:datasets.NUM_CLASSES] = datasets.PALETTE
    return lut[train_ids]


def grid(rows, titles, path):
    """Tile equal-sized RGB arrays, a title over each column; write a PNG atomically."""
    h, w = rows[0][0].shape[:2]
    top = 16
    canvas = Image.new("RGB", (w * len(titles), top + h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((j * w + 4, 2), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (j * w, top + i * h))
    atomic_write(path, lambda f: canvas.save(f, "PNG"))
    return canvas


def load_inputs(args, size):
    """(image tensors, label arrays or None) for --images files or the first -n images of a split."""
    if args.images:
        xs = [datasets.to_tensors(datasets.read_image(p, size), np.zeros(size[::-1], np.uint8))[0] for p in args.images]
        return torch.stack(xs), [None] * len(xs)
    Data = datasets.GTA5 if args.dataset == "gta5" else datasets.Cityscapes
    root = args.gta5_root if args.dataset == "gta5" else args.cityscapes_root
    data = Data(root, args.split, size=size, scheme=args.split_scheme, cache=flags.cache_arg(args))
    picks = np.linspace(0, len(data) - 1, min(args.n, len(data))).astype(int)
    pairs = [data[i] for i in picks]
    return torch.stack([p[0] for p in pairs]), [p[1].numpy().astype(np.uint8) for p in pairs]


@torch.no_grad()
def predict(model, x, ctx):
    model.eval()
    with ctx.autocast():
        logits = model(ctx.images(x))
    return torch.softmax(logits.float(), 1).cpu()


def domain_of(args):
    """The BatchNorm statistics a --bn domain checkpoint lends: those of the dataset shown."""
    return "target" if args.dataset == "cityscapes" else "source"


def cmd_predict(args, ctx):
    model, ckpt = models.from_checkpoint(args.checkpoint, domain_of(args))
    model.to(ctx.device)
    size = args.size or models.trained_size(ckpt, args.checkpoint)
    x, labels = load_inputs(args, size)
    probs = predict(model, x, ctx)
    pred = probs.argmax(1).numpy().astype(np.uint8)
    mask = uncertainty_mask(probs, args.entropy_threshold, args.confidence_threshold).numpy()
    rows = []
    for i in range(len(x)):
        gt = colourise(labels[i]) if labels[i] is not None else np.full(pred[i].shape + (3,), 128, np.uint8)
        masked = colourise(pred[i])
        masked[mask[i]] = VOID
        rows.append([x[i].permute(1, 2, 0).numpy(), gt, colourise(pred[i]), masked])
    grid(rows, ["image", "ground truth", "prediction", "uncertainty-masked"], args.out)
    print(f"wrote {args.out}: {len(rows)} images; {mask.mean():.1%} of pixels masked")


def cmd_compare(args, ctx):
    nets, size = [], args.size
    for path in args.checkpoints:
        model, ckpt = models.from_checkpoint(path, domain_of(args))
        nets.append(model.to(ctx.device))
        size = size or models.trained_size(ckpt, path)
    x, labels = load_inputs(args, size)
    preds = [predict(m, x, ctx).argmax(1).numpy().astype(np.uint8) for m in nets]
    rows = [[x[i].permute(1, 2, 0).numpy(), colourise(labels[i]) if labels[i] is not None else np.full(preds[0][i].shape + (3,), 128, np.uint8)]
            + [colourise(p[i]) for p in preds] for i in range(len(x))]
    titles = ["image", "ground truth"] + [Path(p).parent.name + "/" + Path(p).name for p in args.checkpoints]
    grid(rows, titles, args.out)
    print(f"wrote {args.out}: {len(rows)} images x {len(nets)} checkpoints")


def read_metrics(run):
    """RUN/metrics.csv as one dict per epoch of floats (nan where a column was left empty; TEXT_COLUMNS as text)."""
    path = Path(run) / "metrics.csv"
    if not path.exists():
        raise UserError(f"{path}: not found; point at a run directory written by train_seg.py or train_mmd.py")
    damaged = f"{path}: damaged (%s); the run's numbers are also in its last.pt, or train again"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:  # ValueError: not UTF-8, or NUL bytes
        raise UserError(damaged % f"not a readable CSV: {str(e)[:80]}") from None
    if not rows:
        raise UserError(f"{path}: holds no epochs yet")
    if "epoch" not in rows[0]:
        raise UserError(damaged % "no 'epoch' column")
    metrics = []
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise UserError(damaged % f"line {line} has {'more' if None in row else 'fewer'} fields than the header")
        values = {}
        for k, v in row.items():
            try:
                values[k] = v if k in TEXT_COLUMNS else float(v) if v != "" else math.nan
            except ValueError:
                raise UserError(damaged % f"line {line}: {k} is {v[:20]!r}, not a number") from None
        if not (math.isfinite(values["epoch"]) and values["epoch"] >= 0 and values["epoch"] == int(values["epoch"])):
            raise UserError(damaged % f"line {line}: epoch {row['epoch'][:20]!r} is not a whole number")
        metrics.append(values)
    return metrics


def run_name(run):
    """The run's folder name, with the adaptation settings its args.json records (a damaged args.json costs
    the settings, with a warning, not the figure)."""
    name, path = Path(run).name, Path(run) / "args.json"
    if not path.exists():
        return name
    try:
        args = json.loads(path.read_text(encoding="utf-8"))["args"]
        settings = [f"lam {float(args['lam']):g}"] if "lam" in args else []
        settings += ["multilevel"] if args.get("multilevel") else []
        settings += [f"coral {float(args['coral']):g}"] if args.get("coral") else []
        settings += [f"--bn {args['bn']}"] if isinstance(args.get("bn"), str) else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        print(f"warning: {path}: unreadable ({type(e).__name__}); the run is named by its folder alone", file=sys.stderr)
        return name
    return f"{name} ({', '.join(settings)})" if settings else name


def cmd_curves(args, ctx):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [(run_name(run), read_metrics(run)) for run in args.runs]  # a damaged file stops us before any figure
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs:
        ep = [r["epoch"] for r in rows]
        for key in ("train_loss", "val_loss", "seg_loss", "mmd_loss"):
            if key in rows[0] and any(r[key] == r[key] for r in rows):
                ax_loss.plot(ep, [r[key] for r in rows], marker=".", label=f"{name}: {key}")
        for key in ("train_miou", "val_miou", "source_val_miou", "target_val_miou"):
            if key in rows[0]:
                ax_miou.plot(ep, [r[key] for r in rows], marker=".", label=f"{name}: {key}")
    for ax, title in ((ax_loss, "loss"), (ax_miou, "mIoU")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)  # pyplot keeps every figure until closed: scripts are also called in-process
    print(f"wrote {args.out}")


def cmd_legend(args, ctx):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    fig = plt.figure(figsize=(7, 2.2))
    handles = [Patch(color=np.array(c) / 255, label=n) for n, c in zip(datasets.CLASS_NAMES, datasets.PALETTE)]
    fig.legend(handles=handles, loc="center", ncol=5, frameon=False, fontsize=9)
    atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)  # pyplot keeps every figure until closed: scripts are also called in-process
    print(f"wrote {args.out}")


def cmd_table(args, ctx):
    """Two tables like the report's 4 and 5: the epoch with the best source / target val mIoU of each run,
    rows source train / source val / target val mIoU, a column per run; 'before' is each run's epoch 0."""
    runs = []
    names = {"train_miou": "Source train mIoU", "source_val_miou": "Source val mIoU", "target_val_miou": "Target val mIoU"}
    for run in args.runs:
        rows = read_metrics(run)
        missing = [k for k in names if k not in rows[0]]
        if missing:
            raise UserError(f"{run}: not a train_mmd.py run (no {', '.join(missing)} column in metrics.csv)")
        if not any(r["epoch"] >= 1 for r in rows):
            raise UserError(f"{run}: no adaptation epoch has finished yet")
        runs.append((run_name(run), rows))
    text = ""
    for pick in ("source_val_miou", "target_val_miou"):
        best = [max((r for r in rows if r["epoch"] >= 1), key=lambda r: r[pick]) for _, rows in runs]
        header = ["", "before adaptation"] + [f"{name} (epoch {int(b['epoch'])})" for (name, _), b in zip(runs, best)]
        lines = [f"Best {pick.split('_')[0]} val mIoU over the adaptation epochs:", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, label in names.items():
            before = runs[0][1][0].get(key, math.nan)
            lines.append(f"| {label} | " + ("" if before != before else f"{before:.4f}") + " | "
                         + " | ".join(f"{b[key]:.4f}" for b in best) + " |")
        text += "\n".join(lines) + "\n\n"
    if args.out:
        atomic_write(args.out, lambda f: f.write(text), mode="w")
    print(text, end="")


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def images(sp, out):
        sp.add_argument("--dataset", choices=("gta5", "cityscapes"), default="cityscapes")
        sp.add_argument("--split", choices=datasets.SPLITS, default="val")
        sp.add_argument("-n", type=int, default=4, help="images, evenly spaced over the split (default: 4)")
        sp.add_argument("--images", nargs="+", metavar="PNG", help="image files instead of a split (no labels)")
        sp.add_argument("--size", type=parse_size, default=None,
                        metavar="WxH", help="input size (default: the checkpoint's training size)")
        sp.add_argument("--out", default=out, help="PNG to write (default: %(default)s)")
        sp.add_argument("--device", choices=DEVICES, default="auto")
        flags.add_data_args(sp)

    sp = sub.add_parser("predict", help="image | ground truth | prediction | uncertainty-masked prediction")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--entropy-threshold", type=float, default=0.34,
                    help="mask pixels whose entropy / log 19 is above this (0..1; default 0.34, which is the "
                         "report's 1 nat)")
    sp.add_argument("--confidence-threshold", type=float, default=0.5,
                    help="mask pixels whose top class probability is below this (default: %(default)s)")
    images(sp, "predictions.png")
    sp = sub.add_parser("compare", help="several checkpoints side by side on the same images")
    sp.add_argument("--checkpoints", nargs="+", required=True)
    images(sp, "compare.png")
    sp = sub.add_parser("curves", help="loss and mIoU per epoch from RUN/metrics.csv")
    sp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    sp.add_argument("--out", default="curves.png")
    sp = sub.add_parser("legend", help="the 19 classes and their colours")
    sp.add_argument("--out", default="legend.png")
    sp = sub.add_parser("table", help="markdown table of several train_mmd.py runs, laid out like the report's")
    sp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    sp.add_argument("--out", default=None, help="also write the table to this file")
    return p


def main(args):
    ctx = None
    if args.command in ("predict", "compare"):
        if args.n < 1:
            raise UserError(f"-n {args.n}: must be at least 1")
        if args.command == "predict":
            check_fractions(args, "entropy_threshold", "confidence_threshold")
        datasets.resolve_data_roots(args)
        args.amp = "off"
        ctx = Context(args)
    {"predict": cmd_predict, "compare": cmd_compare, "curves": cmd_curves, "legend": cmd_legend,
     "table": cmd_table}[args.command](args, ctx)


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
