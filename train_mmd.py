"""Phase 2: adapt a phase-1 model to Cityscapes with L_seg(GTA-V) + lam · MMD(GTA-V embeddings, Cityscapes
embeddings). Cityscapes labels are never used for training, only to report target val mIoU.

    python train_mmd.py --model deeplab --lam 0.01 --multilevel
    python train_mmd.py --toy --model deeplab --size 128x64 --lam 0.01 --multilevel --epochs 2

Each step runs ONE forward pass over the concatenated batch (4 GTA-V + 4 Cityscapes images): the logits
of the source half feed the segmentation loss, the taps of both halves feed MMD. In training mode
BatchNorm therefore normalises with statistics of the mixed batch, and its running statistics (used at
evaluation) track the mix of both domains.
"""
import argparse
from pathlib import Path

import torch

import datasets
import engine
import models
from losses import SegLoss, coral, mmd, multilevel_mmd
from utils import ArgumentParser, Context, UserError, ensure_writable, run_main


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_train_args(p, epochs=10, batch_size=4)
    p.add_argument("--init", default=None,
                   help="phase-1 checkpoint to start from (default: runs/seg_<model>_<W>x<H>/best.pt)")
    p.add_argument("--lam", type=float, default=0.01, help="weight of the MMD term (default: %(default)s)")
    p.add_argument("--multilevel", action="store_true",
                   help="MMD = mean of the backbone MMD and the head MMD (DeepLabV3: ASPP output; U-Net: first "
                        "decoder block)")
    p.add_argument("--sigma", type=float, default=None,
                   help="fixed Gaussian bandwidth (the report's is 1, which gives no gradient on backbone "
                        "embeddings); default: median heuristic with a family of bandwidths around it")
    p.add_argument("--coral", type=float, default=0.0,
                   help="weight of Deep CORAL (covariance alignment) on the backbone features (default: off)")
    datasets.add_data_args(p)
    return p


def main(args):
    engine.check_train_args(args)
    for name in ("lam", "coral"):
        engine.non_negative_weight(args, name)
    if args.sigma is not None and not 0 < args.sigma < float("inf"):
        raise UserError(f"--sigma {args.sigma}: must be a positive number")
    w, h = args.size
    args.out = args.out or f"runs/mmd_{args.model}_{w}x{h}_lam{args.lam:g}" + ("_ml" if args.multilevel else "")
    resume = Path(args.out) / "last.pt" if args.resume == "last" else args.resume and Path(args.resume)
    args.init = args.init or f"runs/seg_{args.model}_{w}x{h}/best.pt"
    if resume and resume.exists():
        start = resume  # continuing: the phase-1 checkpoint is not needed any more
    elif Path(args.init).exists():
        start = args.init
    else:
        toy = " --toy --weights none" if args.toy else ""
        raise UserError(f"{args.init}: no phase-1 checkpoint; run `python train_seg.py --model {args.model} "
                        f"--size {w}x{h}{toy}` first, or pass --init")
    model, init = models.from_checkpoint(start)
    config = init["config"]
    if config["model"] != args.model:
        raise UserError(f"{start}: checkpoint is a {config['model']} model, not {args.model}; pass "
                        f"--model {config['model']} or another --init")
    ensure_writable(args.out)
    datasets.resolve_data_roots(args)
    ctx = Context(args)
    model.to(ctx.device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)

    common = dict(size=args.size, scheme=args.split_scheme, skip_bad=args.skip_bad, cache=datasets.cache_arg(args))
    source = datasets.GTA5(args.gta5_root, "train", limit=args.train_limit, hflip=args.hflip, **common)
    target = datasets.Cityscapes(args.cityscapes_root, "train", hflip=args.hflip, labels=False, **common)
    source_loader = engine.make_loader(source, ctx, args.batch_size, args.workers, args.seed)
    # the target stream is as long as the source epoch, cycling through its own seeded permutations
    target_loader = engine.make_loader(target, ctx, args.batch_size, args.workers, args.seed,
                                       per_rank=len(source_loader.sampler), salt="target")
    val_sets = {"source": datasets.GTA5(args.gta5_root, "val", **common),
                "target": datasets.Cityscapes(args.cityscapes_root, "val", **common)}
    val_loaders = {k: engine.make_loader(d, ctx, args.batch_size, args.workers, train=False)
                   for k, d in val_sets.items()}
    criterion = SegLoss(args.lambda_dice, reduce=ctx.sum_over_ranks)  # the global batch's loss under DDP
    val_criterion = SegLoss(args.lambda_dice)  # per batch: evaluate() averages it over the split
    optimizer = engine.adam(model.parameters(), args.lr, ctx.device)
    domain_loss = multilevel_mmd if args.multilevel else lambda s, t, sigma: mmd(s["backbone"], t["backbone"], sigma)
    ctx.print(f"{args.model}/{config['backbone']} from {start}: {len(source)} GTA-V + {len(target)} Cityscapes "
              f"train images at {w}x{h}, lam {args.lam:g}, {'multilevel ' if args.multilevel else ''}MMD with "
              f"{'sigma ' + format(args.sigma, 'g') if args.sigma else 'median-heuristic bandwidths'}"
              + (f", CORAL {args.coral:g}" if args.coral else "") + f"; writing {args.out}")

    def step(net, batches, train_cm):
        (xs, ys), (xt, _) = batches  # target labels are all 255 here: the loader was built without them
        n = len(xs)
        logits, taps = net(ctx.images(xs, xt), taps=True)
        src, tgt = {k: v[:n] for k, v in taps.items()}, {k: v[n:] for k, v in taps.items()}
        ys = ctx.labels(ys)
        seg = criterion(logits[:n], ys)
        dist = domain_loss(src, tgt, args.sigma)
        train_cm.update(ys, logits[:n].detach().argmax(1))
        loss, logs = seg + args.lam * dist, {"seg_loss": seg, "mmd_loss": dist}
        if args.coral:
            logs["coral_loss"] = coral(src["backbone"], tgt["backbone"])
            loss = loss + args.coral * logs["coral_loss"]
        return loss, logs

    def validate(model):
        s = engine.evaluate(model, val_loaders["source"], ctx, val_criterion)
        t = engine.evaluate(model, val_loaders["target"], ctx, val_criterion)
        return {"source_val_miou": s["miou"], "target_val_miou": t["miou"], "source_val_loss": s["loss"],
                "target_val_loss": t["loss"]}

    phase = engine.Phase("mmd", step, validate, validate_first=True,
                         best={"best_source.pt": "source_val_miou", "best_target.pt": "target_val_miou"},
                         resume_keys=("lam", "multilevel", "sigma", "coral"))
    state = engine.fit(ctx, args, model, optimizer, [source_loader, target_loader], phase, config)
    if state["epoch"] >= args.epochs:
        ctx.print(summary(state["history"], args.out))
    ctx.close()


def summary(history, out):
    """Source and target val mIoU before adaptation, at the last epoch and at the best-source epoch (chosen
    without target labels), and the best-target epoch, labelled as chosen with target labels."""
    before, epochs = history[0], history[1:]
    best_source = max(epochs, key=lambda r: r["source_val_miou"])
    best_target = max(epochs, key=lambda r: r["target_val_miou"])
    rows = [("before adaptation", before, ""), (f"last epoch ({epochs[-1]['epoch']})", epochs[-1], f"{out}/last.pt"),
            (f"best source val epoch ({best_source['epoch']})", best_source, f"{out}/best_source.pt"),
            (f"best target val epoch ({best_target['epoch']})", best_target,
             f"{out}/best_target.pt: chosen with target labels, which adaptation may not use")]
    lines = [f"{'':30} source val mIoU  target val mIoU"]
    lines += [f"{name:30} {r['source_val_miou']:15.4f}  {r['target_val_miou']:15.4f}  {where}".rstrip()
              for name, r, where in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
