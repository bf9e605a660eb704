"""Per-class IoU, mIoU and pixel accuracy of a checkpoint on a split of GTA-V or Cityscapes.

    python evaluate.py --checkpoint runs/mmd_deeplab_480x256_lam0.01_ml/best_target.pt --dataset cityscapes
    python evaluate.py --checkpoint ... --split-scheme official --full-res --save-preds preds/   # official protocol
    python evaluate.py --checkpoint runs/seg_deeplab_480x256/best.pt --adabn     # source-only model + AdaBN

Default protocol (the report's): images and labels resized to the training size. --full-res: logits are
upsampled to each label's stored resolution before the argmax (the literature's protocol for Cityscapes).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import batchnorm
import datasets
import flags
import models
from flags import add_dist_timeout, check_dist_timeout
from sampling import make_loader
from files import atomic_write, ensure_writable
from devices import AMP_MODES, DEVICES, Context
from utils import NUM_CLASSES, ArgumentParser, ConfusionMatrix, UserError, parse_size, run_main


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train_seg.py or train_mmd.py")
    p.add_argument("--dataset", choices=("gta5", "cityscapes"), default="cityscapes")
    p.add_argument("--split", choices=datasets.SPLITS, default="val")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help="input size (default: the size the checkpoint was trained at)")
    p.add_argument("--full-res", action="store_true", help="score at each label's stored resolution")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average with the prediction of the mirrored image")
    p.add_argument("--adabn", action="store_true",
                   help="AdaBN: first re-estimate every BatchNorm layer's statistics as the mean and variance of its "
                        "input over the train split of --dataset (images only, labels never used): the target train "
                        "images for cityscapes")
    p.add_argument("--save-preds", metavar="DIR",
                   help="write each prediction as a PNG of Cityscapes label ids, named for cityscapesscripts")
    p.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="auto: bf16 where the device computes it natively, fp16 on older GPUs, else off")
    add_dist_timeout(p)
    flags.add_data_args(p)
    return p


@torch.no_grad()
def evaluate(model, loader, ctx, criterion=None, num_classes=NUM_CLASSES, tta=False, on_prediction=None):
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
        x, y = ctx.images(x), ctx.labels(y)
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
    ctx.all_reduce(cm.mat, sums)
    iou, miou, acc = cm.compute()
    loss = (sums[0] / sums[1]).item() if criterion is not None and sums[1] > 0 else float("nan")
    return {"miou": miou, "pixel_acc": acc, "iou": iou.tolist(), "loss": loss, "images": int(sums[1].item())}


def cityscapes_evaluation():
    """cityscapesscripts' pixel-level evaluation module (to score --save-preds files with). It calls np.in1d, which
    numpy 2.4 removed: where it is gone, np.isin flattened stands in (the same values; each call's result is
    reshaped by cityscapesscripts itself)."""
    if not hasattr(np, "in1d"):
        np.in1d = lambda a, b, **kwargs: np.isin(a, b, **kwargs).ravel()
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling
    return evalPixelLevelSemanticLabeling


def prediction_name(dataset, name):
    """GTA-V: 00001.png; Cityscapes: CITY_SEQ_FRAME_pred_labelIds.png, which cityscapesscripts matches."""
    return name if dataset == "gta5" else f"{name}_pred_labelIds.png"


def main(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    check_dist_timeout(args)
    if args.save_preds and not args.full_res:
        raise UserError("--save-preds needs --full-res: cityscapesscripts compares predictions with the labels "
                        "at their stored resolution")
    datasets.resolve_data_roots(args)
    # a checkpoint with BatchNorm statistics per domain (train_mmd.py --bn domain): those of the dataset scored
    model, ckpt = models.from_checkpoint(args.checkpoint, "target" if args.dataset == "cityscapes" else "source")
    size = args.size or models.trained_size(ckpt, args.checkpoint)
    ctx = Context(args)
    model.to(ctx.device)
    # --full-res scores against the labels as stored: the cache holds them resized
    common = dict(size=size, scheme=args.split_scheme, skip_bad=args.skip_bad,
                  cache=not args.full_res and flags.cache_arg(args))
    if args.dataset == "gta5":
        data = datasets.GTA5(args.gta5_root, args.split, **common)
    else:
        data = datasets.Cityscapes(args.cityscapes_root, args.split, **common)
    if args.adabn:
        adabn(model, args, ctx, common)
    data.full_res_labels = args.full_res
    # full-resolution labels may differ in size from image to image (GTA-V): one image per batch then
    loader = make_loader(data, ctx, 1 if args.full_res else args.batch_size, args.workers, train=False)

    if args.save_preds:
        ensure_writable(args.save_preds)

    def save(indices, pred):
        for i, p in zip(indices, pred.cpu().numpy().astype(np.uint8)):
            png = Image.fromarray(datasets.TRAINID_TO_ID[p])  # trainIds -> Cityscapes ids
            path = Path(args.save_preds) / prediction_name(args.dataset, data.items[i][0])
            atomic_write(path, lambda f: png.save(f, "PNG"))

    r = evaluate(model, loader, ctx, tta=args.tta == "flip", on_prediction=save if args.save_preds else None)
    w, h = size
    ctx.print(f"{args.checkpoint} on {args.dataset} {args.split} ({args.split_scheme} split, {r['images']} images, "
              f"{'full resolution' if args.full_res else f'{w}x{h}'}{', flip TTA' if args.tta == 'flip' else ''}"
              f"{', AdaBN' if args.adabn else ''})")
    for name, iou in zip(datasets.CLASS_NAMES, r["iou"]):
        ctx.print(f"  {name:<14} {iou:7.4f}" if iou == iou else f"  {name:<14}     n/a  (absent)")
    ctx.print(f"  {'mIoU':<14} {r['miou']:7.4f}\n  {'pixel acc':<14} {r['pixel_acc']:7.4f}")
    if args.json and ctx.main:
        result = {"miou": r["miou"], "pixel_acc": r["pixel_acc"],
                  "per_class": {n: (v if v == v else None) for n, v in zip(datasets.CLASS_NAMES, r["iou"])},
                  "checkpoint": str(args.checkpoint), "dataset": args.dataset, "split": args.split,
                  "split_scheme": args.split_scheme, "images": r["images"], "size": [w, h],
                  "full_res": args.full_res, "tta": args.tta, "adabn": args.adabn}
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=1)), mode="w")
    ctx.close()
    return r


def adabn(model, args, ctx, common):
    """AdaBN over the train split of the dataset scored, images only (every process the same, whole split)."""
    common = {**common, "cache": flags.cache_arg(args)}  # images at the input size, also under --full-res
    try:
        if args.dataset == "gta5":
            data = datasets.GTA5(args.gta5_root, "train", **common)
        else:
            data = datasets.Cityscapes(args.cityscapes_root, "train", labels=False, **common)
    except UserError as e:
        raise UserError(f"--adabn needs the train images of {args.dataset}: {e}") from None
    # one pass per BatchNorm layer: the workers stay
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=ctx.device.type == "cuda", persistent_workers=args.workers > 0)
    with ctx.autocast():
        layers = batchnorm.adabn(model, lambda: (ctx.images(x) for x, _ in loader))
    if not layers:
        raise UserError(f"{args.checkpoint}: its model has no BatchNorm layer; --adabn has nothing to re-estimate")
    ctx.print(f"AdaBN: the statistics of {layers} BatchNorm layers re-estimated on {len(data)} {args.dataset} train "
              "images (labels not used)")


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
