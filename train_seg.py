"""Phase 1: train U-Net or DeepLabV3 on GTA-V (source) labels only; keep the best checkpoint by val mIoU.

    python train_seg.py --model deeplab --weights imagenet --gta5-root /data/gta5
    python train_seg.py --toy --backbone resnet18 --size 128x64 --epochs 3      # the built-in pair
"""
import argparse

import torch

import datasets
import engine
import flags
import models
import sampling
from evaluate import evaluate
from losses import SegLoss
from files import check_new_run, ensure_writable
from devices import Context
from utils import ArgumentParser, run_main


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_train_args(p, epochs=25, batch_size=8)
    p.add_argument("--backbone", choices=models.BACKBONES, default="resnet50")
    p.add_argument("--weights", default="imagenet",
                   help="none | imagenet (backbone) | coco (DeepLabV3, resnet50/101) | a checkpoint path "
                        "(default: %(default)s)")
    p.add_argument("--train-on", choices=("gta5", "cityscapes"), default="gta5",
                   help="cityscapes trains on target labels: the oracle upper bound (default: %(default)s)")
    flags.add_data_args(p)
    return p


def main(args):
    flags.check_train_args(args)
    models.check_model_args(args.model, args.backbone, args.weights)
    w, h = args.size
    args.out = args.out or phase1_out(args.model, args.size, args.seed, args.train_on)
    check_new_run(args.out, args.resume)
    ensure_writable(args.out)
    datasets.resolve_data_roots(args)
    ctx = Context(args)
    # a checkpoint with BatchNorm statistics per domain (train_mmd.py --bn domain) lends those of the data trained on
    domain = "target" if args.train_on == "cityscapes" else "source"
    model = models.build_model(args.model, args.backbone, args.weights, domain=domain).to(ctx.device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    Data = datasets.GTA5 if args.train_on == "gta5" else datasets.Cityscapes
    root = args.gta5_root if args.train_on == "gta5" else args.cityscapes_root
    common = dict(size=args.size, scheme=args.split_scheme, skip_bad=args.skip_bad, cache=flags.cache_arg(args))
    train_set = Data(root, "train", limit=args.train_limit, hflip=args.hflip, aug=args.aug, **common)
    val_set = Data(root, "val", **common)
    train_loader = sampling.make_loader(train_set, ctx, args.batch_size, args.workers, args.seed)
    val_loader = sampling.make_loader(val_set, ctx, args.batch_size, args.workers, train=False)
    criterion = SegLoss(args.lambda_dice, reduce=ctx.sum_over_ranks)  # the global batch's loss under DDP
    val_criterion = SegLoss(args.lambda_dice)  # per batch: evaluate() averages it over the split
    optimizer = engine.adam(model.parameters(), args.lr, ctx.device)
    ctx.print(f"{args.model}/{args.backbone} on {args.train_on}: {len(train_set)} train, {len(val_set)} val images "
              f"at {w}x{h}, device {ctx.device}, amp {ctx.amp}, {ctx.world} process(es); writing {args.out}")

    def step(net, batches, train_cm):
        x, y = batches[0]
        x, y = ctx.images(x), ctx.labels(y)
        logits = net(x)
        loss = criterion(logits, y)
        train_cm.update(y, logits.detach().argmax(1))
        return loss, {"train_loss": loss}

    def validate(model):
        r = evaluate(model, val_loader, ctx, val_criterion)
        return {"val_loss": r["loss"], "val_miou": r["miou"], "val_pixel_acc": r["pixel_acc"]}

    phase = engine.Phase("seg", step, validate, best={"best.pt": "val_miou"}, resume_keys=("train_on",))
    config = models.model_config(args.model, args.backbone, datasets.NUM_CLASSES)
    state = engine.fit(ctx, args, model, optimizer, [train_loader], phase, config)
    if state["epoch"] >= args.epochs:
        ctx.print(f"done: best val mIoU {state['best'].get('val_miou', float('nan')):.4f} in {args.out}/best.pt")
    ctx.close()


def phase1_out(model, size, seed, train_on="gta5"):
    """The default folder, runs/seg_<model>_<W>x<H>[_oracle][_seed<S>]: where phase 2 looks for its --init by
    model, size and seed. Other settings stay out of it (phase 2 could not guess them): a run of other settings
    into it is refused, never written over it."""
    w, h = size
    return (f"runs/seg_{model}_{w}x{h}" + ("_oracle" if train_on == "cityscapes" else "")
            + (f"_seed{seed}" if seed else ""))


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
