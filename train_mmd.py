"""Phase 2: adapt a phase-1 model to Cityscapes with L_seg(GTA-V) + lam · MMD(GTA-V embeddings, Cityscapes
embeddings). Cityscapes labels are never used for training, only to report target val mIoU.

    python train_mmd.py --model deeplab --lam 0.01 --multilevel
    python train_mmd.py --toy --model deeplab --size 128x64 --lam 0.01 --multilevel --epochs 2

Each step runs ONE forward pass over the concatenated batch (4 GTA-V + 4 Cityscapes images): the logits
of the source half feed the segmentation loss, the taps of both halves feed MMD. Which statistics BatchNorm
normalises each domain with, in training and at evaluation, is --bn (batchnorm.py): by default each domain
its own.
"""
import argparse
from pathlib import Path

import torch

import batchnorm
import datasets
import engine
import flags
import models
import sampling
import train_seg
from evaluate import evaluate
from losses import (SegLoss, coral, dacs_batch, dacs_loss, discriminator_losses, ema_decay, ema_update, entropy_loss,
                    fda, make_teacher, mmd, multilevel_mmd, teacher_probs)
from files import check_new_run, ensure_writable
from devices import Context
from utils import IGNORE, ArgumentParser, UserError, run_main


# --pseudo, self-training on the report's uncertainty mask, scored 0.142 below the lam-0 control in the benchmark
REMOVED_PSEUDO = ("self-training on the report's uncertainty mask did worse than no method at all in the benchmark; "
                  "use --dacs W, DACS self-training (an EMA teacher and ClassMix; docs/methods.md)")


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_train_args(p, epochs=10, batch_size=4)
    p.add_argument("--init", default=None,
                   help="phase-1 checkpoint to start from (default: phase 1's default folder for this --model, --size "
                        "and --seed: runs/seg_<model>_<W>x<H>[_seed<S>]/best.pt)")
    p.add_argument("--pseudo", "--pseudo-ema", "--pseudo-entropy", "--pseudo-confidence", action=flags.Removed,
                   const=REMOVED_PSEUDO, help=argparse.SUPPRESS)
    p.methods = m = flags.Methods(p)
    mmd = m.method("MMD", "the report's method; off with --lam 0 (the control, or another method alone)")
    mmd("--lam", type=float, default=0.01, check=flags.weight, help="weight of the MMD term (default: %(default)s)")
    mmd("--multilevel", action="store_true", token="ml",
        help="MMD = mean of the backbone MMD and the head MMD (DeepLabV3: ASPP output; U-Net: first decoder block)")
    mmd("--sigma", type=float, default=None, check=flags.positive,
        help="fixed Gaussian bandwidth (the report's is 1, which gives no gradient on backbone embeddings); default: "
             "median heuristic with a family of bandwidths around it")
    m.setting("--bn", choices=batchnorm.BN_MODES, default=batchnorm.DEFAULT_MODE,
              help="BatchNorm statistics for each domain. domain: each its own, in training (batch statistics) and at "
                   "evaluation (running statistics); frozen: phase 1's for both, in training and at evaluation; "
                   "mixed: the concatenated batch's in training and a blend at evaluation (the project's behaviour "
                   "before --bn). Default %(default)s: see the README's benchmark")
    coral = m.method("CORAL")
    coral("--coral", type=float, default=0.0, check=flags.weight,
          help="weight of Deep CORAL (covariance alignment) on the backbone features (default: off)")
    ent = m.method("entropy minimisation", "ADVENT's MinEnt")
    ent("--ent", type=float, default=0.0, metavar="W", check=flags.weight,
        help="W · mean entropy / log 19 of the target predictions (ADVENT: 0.001; default: off)")
    fda = m.method("FDA", "Fourier domain adaptation (Yang & Soatto 2020)")
    fda("--fda", type=float, default=None, metavar="BETA", check=beta,
        help="source images take their paired target image's amplitude in the low-frequency square of half-side "
             "BETA · min(H, W), BETA in (0, 0.5] (FDA used 0.01, 0.05, 0.09; default: off)")
    adv = m.method("output-space adversarial", "AdaptSegNet (Tsai et al. 2018)")
    adv("--adv", type=float, default=0.0, metavar="W", check=flags.weight,
        help="W · BCE(D(softmax(target)), source); AdaptSegNet used 0.001 (default: off)")
    adv("--adv-lr", type=float, default=1e-4, check=flags.positive,
        help="the discriminator's Adam learning rate (default: %(default)s)")
    dacs = m.method("DACS self-training", "Tranheden et al. 2021; docs/methods.md says what we do differently")
    dacs("--dacs", type=float, default=0.0, metavar="W", check=flags.weight,
         help="W · the weighted CE of ClassMix images (source pixels of half the source classes pasted on a target "
              "image) against source labels and an EMA teacher's target pseudo-labels (DACS: 1; default: off)")
    dacs("--dacs-ema", type=float, default=0.99, metavar="A", check=flags.decay,
         help="the teacher's decay, min(1 - 1/(t+1), A) at step t, in [0, 1) (default: DACS's %(default)s; under "
              "DAFormer's 0.999 the teacher stays the plain average of every weight so far for 1000 steps, more than "
              "3x a run on the built-in pair)")
    dacs("--dacs-threshold", type=float, default=0.968, metavar="T", check=flags.fraction,
         help="pseudo-label weight = the share of target pixels whose teacher top probability is >= T (default: the "
              "references' %(default)s)")
    dacs("--dacs-jitter", type=float, nargs=2, default=[0.8, 0.2], metavar=("P", "S"), check=jitter,
         help="colour jitter of each mixed image with probability P, factors in 1 ± S and hue ± S (default: "
              "DAFormer's 0.8 0.2)")
    dacs("--dacs-blur", type=float, default=0.5, metavar="P", check=flags.fraction,
         help="Gaussian blur of each mixed image with probability P, sigma ~ U(0.15, 1.15) (default: the references' "
              "%(default)s)")
    dacs("--dacs-ignore", type=float, nargs=2, default=[0.0, 0.0], metavar=("TOP", "BOTTOM"), check=bands,
         help="pseudo-label weight 0 in the top and bottom bands, shares of the height (DAFormer: 15 and 120 rows of "
              "512, 0.03 0.23; default: none)")
    rcs = m.method("rare class sampling", "of the source images (DAFormer)")
    rcs("--rcs", type=float, default=None, metavar="T", check=flags.positive,
        help="temperature T > 0 (DAFormer: 0.01; default: off, a plain permutation)")
    rcs("--rcs-min-share", type=float, default=0.0033, metavar="S", check=flags.fraction,
        help="an image is drawn for class c if c covers at least S of its pixels (default: DAFormer's 3000 pixels "
             "of 1280x720, %(default)s)")
    flags.add_data_args(p)
    return p


def beta(flag, value):
    if not 0 < value <= 0.5:
        raise UserError(f"{flag} {value}: beta must be in (0, 0.5] (a share of the image's smaller side)")


def jitter(flag, value):
    if not (0 <= value[0] <= 1 and 0 <= value[1] <= 0.5):
        raise UserError(f"{flag} {value[0]:g} {value[1]:g}: the probability must be in [0, 1] and the strength in "
                        "[0, 0.5]")


def bands(flag, value):
    if not (0 <= value[0] and 0 <= value[1] and sum(value) < 1):
        raise UserError(f"{flag} {value[0]:g} {value[1]:g}: shares of the height, >= 0, that leave some rows between "
                        "them (sum below 1)")


def main(args):
    parser = get_args_parser()  # the methods' declarations and the defaults the folder name compares with
    methods = parser.methods
    flags.check_train_args(args)
    methods.check(args)
    w, h = args.size
    args.out = args.out or flags.default_out(args, f"runs/mmd_{args.model}_{w}x{h}_lam{args.lam:g}", parser, methods,
                                             named=("size", "lam"))
    check_new_run(args.out, args.resume)
    resume = Path(args.out) / "last.pt" if args.resume == "last" else args.resume and Path(args.resume)
    args.init = args.init or f"{train_seg.phase1_out(args.model, args.size, args.seed)}/best.pt"
    if resume and resume.exists():
        start = resume  # continuing: the phase-1 checkpoint is not needed any more
    elif Path(args.init).exists():
        start = args.init
    else:
        toy = " --toy --weights none" if args.toy else ""
        seed = f" --seed {args.seed}" if args.seed else ""
        raise UserError(f"{args.init}: no phase-1 checkpoint; run `python train_seg.py --model {args.model} "
                        f"--size {w}x{h}{seed}{toy}` first, or pass --init")
    model, init = models.from_checkpoint(start)
    if start == resume and init.get("args", {}).get("pseudo"):
        raise UserError(f"{resume}: that run trained with --pseudo, which was removed: {REMOVED_PSEUDO}; continue it "
                        "with the version of this project that wrote it (git log), or start another --out")
    batchnorm.use_mode(model, args.bn, init["model"])  # target statistics from a --bn domain checkpoint, if it is one
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

    common = dict(size=args.size, scheme=args.split_scheme, skip_bad=args.skip_bad, cache=flags.cache_arg(args))
    train = dict(hflip=args.hflip, aug=args.aug, **common)
    source = datasets.GTA5(args.gta5_root, "train", limit=args.train_limit, **train)
    target = datasets.Cityscapes(args.cityscapes_root, "train", labels=False, **train)
    rcs = None
    if args.rcs:
        rcs = sampling.RareClassSampling(sampling.class_counts(source), args.rcs,
                                         args.rcs_min_share * source.size[0] * source.size[1])  # as stored
        ctx.print("rare class sampling, T " + format(args.rcs, "g") + ": " + ", ".join(
            f"{datasets.CLASS_NAMES[c]} {p:.3f}" for c, p in sorted(zip(rcs.classes, rcs.probs), key=lambda t: -t[1])))
    source_loader = sampling.make_loader(source, ctx, args.batch_size, args.workers, args.seed, draw=rcs)
    # the target stream is as long as the source epoch, cycling through its own seeded permutations
    target_loader = sampling.make_loader(target, ctx, args.batch_size, args.workers, args.seed,
                                         per_rank=len(source_loader.sampler), salt="target")
    val_sets = {"source": datasets.GTA5(args.gta5_root, "val", **common),
                "target": datasets.Cityscapes(args.cityscapes_root, "val", **common)}
    val_loaders = {k: sampling.make_loader(d, ctx, args.batch_size, args.workers, train=False)
                   for k, d in val_sets.items()}
    criterion = SegLoss(args.lambda_dice, reduce=ctx.sum_over_ranks)  # the global batch's loss under DDP
    val_criterion = SegLoss(args.lambda_dice)  # per batch: evaluate() averages it over the split
    optimizer = engine.adam(model.parameters(), args.lr, ctx.device)
    domain_loss = multilevel_mmd if args.multilevel else lambda s, t, sigma: mmd(s["backbone"], t["backbone"], sigma)
    extra = {}
    teacher = make_teacher(model) if args.dacs else None  # self-training: the EMA teacher labels the target images
    if teacher is not None:
        extra["teacher"] = teacher
    if args.adv:
        extra["discriminator"] = discriminator = models.Discriminator(config["num_classes"]).to(ctx.device)
        ctx.broadcast(*(p.detach() for p in discriminator.parameters()))  # every process starts from rank 0's
        extra["d_optimizer"] = engine.adam(discriminator.parameters(), args.adv_lr, ctx.device, betas=(0.9, 0.99))
    ctx.print(f"{args.model}/{config['backbone']} from {start}: {len(source)} GTA-V + {len(target)} Cityscapes "
              f"train images at {w}x{h}, --bn {args.bn}; {methods.describe(args) or 'no method (the control)'}; writing {args.out}")

    domains = batchnorm.split_domains(model, args.batch_size)  # --bn domain: the first part of a batch is source

    def step(net, batches, train_cm):
        (xs, ys), (xt, yt) = batches  # the target "labels" are WITHHELD, and 255 where --aug padded the image
        if args.fda or args.dacs:  # on the device once: FDA and ClassMix work there before the forward
            xs, xt = xs.to(ctx.device, non_blocking=True), xt.to(ctx.device, non_blocking=True)
        if args.fda:
            xs = fda(xs, xt, args.fda)
        ys = ctx.labels(ys)
        if args.ent or args.dacs:
            valid = ctx.labels(yt) != IGNORE  # the target image's own pixels, not --aug's padding
        # the images of one forward pass, by name; under --bn domain the first ("source") are normalised as
        # source, all the others together as target (their batch statistics make the target running statistics)
        views = {"source": xs, "target": xt}
        if args.dacs:  # the teacher labels the clean target images; ClassMix pastes source classes on them
            probs = teacher_probs(teacher, ctx.images(xt))
            views["mixed"], mix_labels, mix_weights, share = dacs_batch(
                probs, xs, ys, xt, valid, args.dacs_threshold, args.dacs_jitter, args.dacs_blur, args.dacs_ignore,
                ctx.rank, ctx.world, ctx.sum_over_ranks)
        with domains:
            out, taps = net(ctx.images(*views.values()), taps=True)
        sizes = [len(v) for v in views.values()]
        logits = dict(zip(views, out.split(sizes)))  # by view: logits["source"], logits["target"], ...
        src = {k: v[:sizes[0]] for k, v in taps.items()}  # the embeddings MMD and CORAL compare
        tgt = {k: v[sizes[0]:sizes[0] + sizes[1]] for k, v in taps.items()}
        seg = criterion(logits["source"], ys)
        dist = domain_loss(src, tgt, args.sigma)
        train_cm.update(ys, logits["source"].detach().argmax(1))
        loss, logs = seg + args.lam * dist, {"seg_loss": seg, "mmd_loss": dist}
        if args.coral:
            logs["coral_loss"] = coral(src["backbone"], tgt["backbone"])
            loss = loss + args.coral * logs["coral_loss"]
        if args.ent:
            logs["ent_loss"] = entropy_loss(logits["target"], valid)
            loss = loss + args.ent * logs["ent_loss"]
        if args.adv:
            probs_s, probs_t = (torch.softmax(logits[k].float(), 1) for k in ("source", "target"))
            logs["adv_loss"], logs["d_loss"] = discriminator_losses(discriminator, probs_s, probs_t)
            loss = loss + args.adv * logs["adv_loss"] + logs["d_loss"]
        if args.dacs:
            logs["dacs_loss"], logs["dacs_weight"] = dacs_loss(logits["mixed"], mix_labels, mix_weights), share
            loss = loss + args.dacs * logs["dacs_loss"]
        return loss, logs

    def validate(model):  # each split with its domain's BatchNorm statistics (--bn domain)
        s = evaluate(batchnorm.set_domain(model, "source"), val_loaders["source"], ctx, val_criterion)
        t = evaluate(batchnorm.set_domain(model, "target"), val_loaders["target"], ctx, val_criterion)
        return {"source_val_miou": s["miou"], "target_val_miou": t["miou"], "source_val_loss": s["loss"],
                "target_val_loss": t["loss"]}

    phase = engine.Phase("mmd", step, validate, validate_first=True,
                         best={"best_source.pt": "source_val_miou", "best_target.pt": "target_val_miou"},
                         resume_keys=methods.resume_keys(args), extra=extra,
                         after_step=None if teacher is None else
                         lambda steps: ema_update(teacher, model, ema_decay(steps, args.dacs_ema)),
                         before={"bn": "mixed"})
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
