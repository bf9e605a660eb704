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
import copy
from pathlib import Path

import torch

import batchnorm
import datasets
import engine
import flags
import models
import sampling
from evaluate import evaluate
from losses import (SegLoss, class_mix, class_mix_masks, confidence_weight, coral, dacs_loss, discriminator_losses,
                    entropy_loss, fda, mmd, multilevel_mmd, outside_bands, pseudo_labels, self_training_loss,
                    strong_augment)
from files import ensure_writable
from utils import IGNORE, NUM_CLASSES, ArgumentParser, Context, UserError, check_fractions, run_main


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_train_args(p, epochs=10, batch_size=4)
    p.add_argument("--init", default=None,
                   help="phase-1 checkpoint to start from (default: runs/seg_<model>_<W>x<H>/best.pt)")
    p.add_argument("--lam", type=float, default=0.01, help="weight of the MMD term (default: %(default)s)")
    p.add_argument("--multilevel", action="store_true",
                   help="MMD = mean of the backbone MMD and the head MMD (DeepLabV3: ASPP output; U-Net: first "
                        "decoder block)")
    p.add_argument("--sigma", type=float, default=None,
                   help="fixed Gaussian bandwidth (the report's is 1, which gives no gradient on backbone "
                        "embeddings); default: median heuristic with a family of bandwidths around it")
    p.add_argument("--bn", choices=batchnorm.BN_MODES, default=batchnorm.DEFAULT_MODE,
                   help="BatchNorm statistics for each domain. domain: each its own, in training (batch statistics) "
                        "and at evaluation (running statistics); frozen: phase 1's for both, in training and at "
                        "evaluation; mixed: the concatenated batch's in training and a blend at evaluation (the "
                        "project's behaviour before --bn). Default %(default)s: see the README's benchmark")
    p.add_argument("--coral", type=float, default=0.0,
                   help="weight of Deep CORAL (covariance alignment) on the backbone features (default: off)")
    m = p.add_argument_group("target-side objectives (each off at 0; any mix, with MMD or without: --lam 0)")
    m.add_argument("--ent", type=float, default=0.0, metavar="W",
                   help="entropy minimisation (ADVENT): W · mean normalised entropy of the target predictions")
    m.add_argument("--pseudo", type=float, default=0.0, metavar="W",
                   help="self-training: W · CE of the target predictions against an EMA teacher's confident argmax")
    m.add_argument("--pseudo-ema", type=float, default=0.99, metavar="A",
                   help="teacher <- A · teacher + (1 - A) · model after every step, in [0, 1) (default: "
                        "%(default)s; DAFormer's 0.999 is for runs of 40k steps)")
    m.add_argument("--pseudo-entropy", type=float, default=0.34, metavar="T",
                   help="ignore pixels whose teacher entropy / log 19 is above T (visualize.py's mask; default: "
                        "%(default)s, the report's 1 nat)")
    m.add_argument("--pseudo-confidence", type=float, default=0.5, metavar="T",
                   help="ignore pixels whose teacher top probability is below T (default: %(default)s)")
    m.add_argument("--fda", type=float, default=None, metavar="BETA",
                   help="Fourier domain adaptation: source images take their paired target image's amplitude in "
                        "the low-frequency square of half-side BETA · min(H, W), BETA in (0, 0.5] (FDA used 0.01, "
                        "0.05, 0.09; default: off)")
    m.add_argument("--adv", type=float, default=0.0, metavar="W",
                   help="output-space adversarial training (AdaptSegNet): W · BCE(D(softmax(target)), source); "
                        "AdaptSegNet used 0.001")
    m.add_argument("--adv-lr", type=float, default=1e-4, help="the discriminator's Adam learning rate (default: "
                   "%(default)s)")
    d = p.add_argument_group("DACS self-training (Tranheden et al. 2021; docs/methods.md says what we do differently)")
    d.add_argument("--dacs", type=float, default=0.0, metavar="W",
                   help="W · the weighted CE of ClassMix images (source pixels of half the source classes pasted "
                        "on a target image) against source labels and an EMA teacher's target pseudo-labels "
                        "(DACS: 1; default: off)")
    d.add_argument("--dacs-ema", type=float, default=0.99, metavar="A",
                   help="the teacher's decay, min(1 - 1/(t+1), A) at step t, in [0, 1) (default: DACS's "
                        "%(default)s; under DAFormer's 0.999 the teacher stays the plain average of every weight "
                        "so far for 1000 steps, more than 3x a run on the built-in pair)")
    d.add_argument("--dacs-threshold", type=float, default=0.968, metavar="T",
                   help="pseudo-label weight = the share of target pixels whose teacher top probability is >= T "
                        "(default: the references' %(default)s)")
    d.add_argument("--dacs-jitter", type=float, nargs=2, default=[0.8, 0.2], metavar=("P", "S"),
                   help="colour jitter of each mixed image with probability P, factors in 1 ± S and hue ± S "
                        "(default: DAFormer's 0.8 0.2)")
    d.add_argument("--dacs-blur", type=float, default=0.5, metavar="P",
                   help="Gaussian blur of each mixed image with probability P, sigma ~ U(0.15, 1.15) (default: the "
                        "references' %(default)s)")
    d.add_argument("--dacs-ignore", type=float, nargs=2, default=[0.0, 0.0], metavar=("TOP", "BOTTOM"),
                   help="pseudo-label weight 0 in the top and bottom bands, shares of the height (DAFormer: 15 and "
                        "120 rows of 512, 0.03 0.23; default: none)")
    d.add_argument("--rcs", type=float, default=None, metavar="T",
                   help="rare class sampling of the source images (DAFormer), temperature T > 0 (DAFormer: 0.01; "
                        "default: off, a plain permutation)")
    d.add_argument("--rcs-min-share", type=float, default=0.0033, metavar="S",
                   help="an image is drawn for class c if c covers at least S of its pixels (default: DAFormer's "
                        "3000 pixels of 1280x720, %(default)s)")
    flags.add_data_args(p)
    return p


def main(args):
    flags.check_train_args(args)
    check_method_args(args)
    if args.sigma is not None and not 0 < args.sigma < float("inf"):
        raise UserError(f"--sigma {args.sigma}: must be a positive number")
    w, h = args.size
    args.out = args.out or default_out(args)
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
    if args.pseudo or args.dacs:  # a copy of the model that gradients never reach, only the moving average
        extra["teacher"] = teacher = batchnorm.set_domain(copy.deepcopy(model).eval().requires_grad_(False), "target")
    if args.adv:
        extra["discriminator"] = discriminator = models.Discriminator(config["num_classes"]).to(ctx.device)
        ctx.broadcast(*(p.detach() for p in discriminator.parameters()))  # every process starts from rank 0's
        extra["d_optimizer"] = engine.adam(discriminator.parameters(), args.adv_lr, ctx.device, betas=(0.9, 0.99))
    ctx.print(f"{args.model}/{config['backbone']} from {start}: {len(source)} GTA-V + {len(target)} Cityscapes "
              f"train images at {w}x{h}, lam {args.lam:g}, {'multilevel ' if args.multilevel else ''}MMD with "
              f"{'sigma ' + format(args.sigma, 'g') if args.sigma else 'median-heuristic bandwidths'}, --bn {args.bn}"
              + (f", CORAL {args.coral:g}" if args.coral else "") + methods_line(args) + f"; writing {args.out}")

    domains = batchnorm.split_domains(model, args.batch_size)  # --bn domain: the first half of a batch is source

    def step(net, batches, train_cm):
        (xs, ys), (xt, yt) = batches  # the target "labels" are WITHHELD, and 255 where --aug padded the image
        n = len(xs)
        if args.fda or args.dacs:  # on the device once: FDA and ClassMix work there before the forward
            xs, xt = xs.to(ctx.device, non_blocking=True), xt.to(ctx.device, non_blocking=True)
        if args.fda:
            xs = fda(xs, xt, args.fda)
        ys = ctx.labels(ys)
        if args.ent or args.pseudo or args.dacs:
            valid = ctx.labels(yt) != IGNORE  # the target image's own pixels, not --aug's padding
        mixed = mix(xs, ys, xt, valid) if args.dacs else None
        # the mixed images go after the target ones: under --bn domain the target side's batch statistics (of
        # target and mixed images together) normalise them, and make the target running statistics
        x = ctx.images(xs, xt, *([mixed[0]] if args.dacs else []))
        with domains:
            logits, taps = net(x, taps=True)
        src, tgt = {k: v[:n] for k, v in taps.items()}, {k: v[n:2 * n] for k, v in taps.items()}
        seg = criterion(logits[:n], ys)
        dist = domain_loss(src, tgt, args.sigma)
        train_cm.update(ys, logits[:n].detach().argmax(1))
        loss, logs = seg + args.lam * dist, {"seg_loss": seg, "mmd_loss": dist}
        if args.coral:
            logs["coral_loss"] = coral(src["backbone"], tgt["backbone"])
            loss = loss + args.coral * logs["coral_loss"]
        if args.ent:
            logs["ent_loss"] = entropy_loss(logits[n:2 * n], valid)
            loss = loss + args.ent * logs["ent_loss"]
        if args.pseudo:
            with torch.no_grad():
                labels = pseudo_labels(teacher(x[n:2 * n]), args.pseudo_entropy, args.pseudo_confidence, valid)
            logs["pseudo_loss"] = self_training_loss(logits[n:2 * n], labels, valid)
            # the share of the target images' pixels it trains on
            logs["pseudo_share"] = (labels != IGNORE).sum() / valid.sum().clamp_min(1)
            loss = loss + args.pseudo * logs["pseudo_loss"]
        if args.adv:
            probs = torch.softmax(logits[:2 * n].float(), 1)
            logs["adv_loss"], logs["d_loss"] = discriminator_losses(discriminator, probs[:n], probs[n:2 * n])
            loss = loss + args.adv * logs["adv_loss"] + logs["d_loss"]
        if args.dacs:
            _, labels, weights, share = mixed
            logs["dacs_loss"], logs["dacs_weight"] = dacs_loss(logits[2 * n:], labels, weights), share
            loss = loss + args.dacs * logs["dacs_loss"]
        return loss, logs

    def mix(xs, ys, xt, valid):
        """DACS's mixed images (0..255, strongly augmented), their labels, per-pixel weights and the
        pseudo-label weight: the teacher labels the clean target images. xs, xt: on the device."""
        with torch.no_grad():
            probs = torch.softmax(teacher(ctx.images(xt)).float(), 1)
        share = confidence_weight(probs, args.dacs_threshold, valid, reduce=ctx.sum_over_ranks)
        paste = class_mix_masks(ys, NUM_CLASSES, ctx.rank, ctx.world)
        images, labels, weights = class_mix(xs.float(), ys, xt.float(), probs.argmax(1), paste, share,
                                            outside_bands(valid, *args.dacs_ignore))
        images = strong_augment(images / 255, *args.dacs_jitter, args.dacs_blur, rank=ctx.rank, world=ctx.world)
        return images * 255, labels, weights, share

    @torch.no_grad()
    def ema_update(steps):  # steps taken; DACS's ramp lets the teacher follow the student closely at first
        decay = min(1 - 1 / steps, args.dacs_ema) if args.dacs else args.pseudo_ema
        torch._foreach_lerp_(list(teacher.parameters()), list(model.parameters()), 1 - decay)
        for mine, theirs in zip(teacher.buffers(), model.buffers()):  # BatchNorm's running statistics
            mine.copy_(theirs)

    def validate(model):  # each split with its domain's BatchNorm statistics (--bn domain)
        s = evaluate(batchnorm.set_domain(model, "source"), val_loaders["source"], ctx, val_criterion)
        t = evaluate(batchnorm.set_domain(model, "target"), val_loaders["target"], ctx, val_criterion)
        return {"source_val_miou": s["miou"], "target_val_miou": t["miou"], "source_val_loss": s["loss"],
                "target_val_loss": t["loss"]}

    phase = engine.Phase("mmd", step, validate, validate_first=True,
                         best={"best_source.pt": "source_val_miou", "best_target.pt": "target_val_miou"},
                         resume_keys=resume_keys(args), extra=extra,
                         after_step=ema_update if args.pseudo or args.dacs else None,
                         before={"bn": "mixed"})
    state = engine.fit(ctx, args, model, optimizer, [source_loader, target_loader], phase, config)
    if state["epoch"] >= args.epochs:
        ctx.print(summary(state["history"], args.out))
    ctx.close()


def check_method_args(args):
    for name in ("lam", "coral", "ent", "pseudo", "adv", "dacs"):
        flags.non_negative_weight(args, name)
    check_fractions(args, "pseudo_entropy", "pseudo_confidence", "dacs_threshold", "dacs_blur")
    if args.rcs is not None and not 0 < args.rcs < float("inf"):
        raise UserError(f"--rcs {args.rcs}: the temperature must be a positive number (DAFormer's is 0.01)")
    check_fractions(args, "rcs_min_share")
    if args.pseudo and args.dacs:
        raise UserError("--pseudo and --dacs: both train on an EMA teacher's pseudo-labels; choose one")
    if not 0 <= args.dacs_ema < 1:
        raise UserError(f"--dacs-ema {args.dacs_ema}: the teacher's decay must be in [0, 1)")
    p, s = args.dacs_jitter
    if not (0 <= p <= 1 and 0 <= s <= 0.5):
        raise UserError(f"--dacs-jitter {p:g} {s:g}: the probability must be in [0, 1] and the strength in [0, 0.5]")
    top, bottom = args.dacs_ignore
    if not (0 <= top and 0 <= bottom and top + bottom < 1):
        raise UserError(f"--dacs-ignore {top:g} {bottom:g}: shares of the height, >= 0, that leave some rows between "
                        "them (sum below 1)")
    if not 0 <= args.pseudo_ema < 1:
        raise UserError(f"--pseudo-ema {args.pseudo_ema}: the teacher's decay must be in [0, 1) (at 1 it would never "
                        "move)")
    if args.fda is not None and not 0 < args.fda <= 0.5:
        raise UserError(f"--fda {args.fda}: beta must be in (0, 0.5] (a share of the image's smaller side)")
    if not 0 < args.adv_lr < float("inf"):
        raise UserError(f"--adv-lr {args.adv_lr}: must be a positive number")


def default_out(args):
    """runs/mmd_<model>_<W>x<H>_lam<lam>[_ml], then each target-side method that is on, with its weight, and
    --bn where it is not the default: one folder per setting (CORAL runs keep the name they had before these
    methods existed)."""
    w, h = args.size
    name = f"runs/mmd_{args.model}_{w}x{h}_lam{args.lam:g}" + ("_ml" if args.multilevel else "")
    if args.bn != batchnorm.DEFAULT_MODE:
        name += f"_bn{args.bn}"
    for flag in ("ent", "pseudo", "fda", "adv", "dacs", "rcs"):
        if getattr(args, flag):
            name += f"_{flag}{getattr(args, flag):g}"
    return name + ("_aug" if args.aug else "")


def resume_keys(args):
    """The method arguments a resumed run must share; a method's own settings only where it is on, so that
    runs from before a method existed resume without it."""
    keys = ["bn", "lam", "multilevel", "sigma", "coral", "ent", "pseudo", "fda", "adv", "dacs", "rcs"]
    if args.pseudo:
        keys += ["pseudo_ema", "pseudo_entropy", "pseudo_confidence"]
    if args.dacs:
        keys += ["dacs_ema", "dacs_threshold", "dacs_jitter", "dacs_blur", "dacs_ignore"]
    if args.rcs:
        keys += ["rcs_min_share"]
    if args.adv:
        keys += ["adv_lr"]
    return tuple(keys)


def methods_line(args):
    parts = [f"entropy {args.ent:g}" if args.ent else "",
             f"self-training {args.pseudo:g} (EMA {args.pseudo_ema:g}, entropy <= {args.pseudo_entropy:g}, "
             f"confidence >= {args.pseudo_confidence:g})" if args.pseudo else "",
             f"FDA beta {args.fda:g}" if args.fda else "", f"adversarial {args.adv:g}" if args.adv else "",
             f"DACS {args.dacs:g} (EMA {args.dacs_ema:g}, threshold {args.dacs_threshold:g})" if args.dacs else ""]
    return "".join(", " + p for p in parts if p)


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
