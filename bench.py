"""Speed and memory: where the time of a training step goes, measured in one run.

    python bench.py --quick --json bench.json     # reduced sizes: a few minutes on 2 CPU cores
    python bench.py --json bench.json             # resnet50, 480x256, batch 8 (the report's setting)

Figures that compare things are ratios of numbers taken in this same run (shared machines are noisy):
model step images/s (fp32, fp32 + channels_last, fp32 + torch.compile, bf16, bf16 + torch.compile), FLOPs
per step and MFU against a matmul peak measured here in the same dtype, the whole train_seg.py loop against
the bare step (decoding PNGs, and reading --cache), the projected time of the report's protocol, the PNG loader against
the --cache loader at GTA-V resolution, our metric against cityscapesscripts' evaluation on the same
predictions, the MMD term's share of a phase-2 step, and the peak memory of a training step.
"""
import argparse
import csv
import glob
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import datasets
import engine
from evaluate import cityscapes_evaluation
import models
from losses import SegLoss, mmd, multilevel_mmd
import toy
from files import atomic_write
from devices import DEVICES, default_workers, native_bf16, pick_device
from utils import ArgumentParser, ConfusionMatrix, UserError, run_main

REPO = Path(__file__).resolve().parent


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds_per_call(fn, device, iters, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def matmul_peak(device, dtype, largest, reps=5):
    """The best FLOP/s of square matrix products up to `largest` in dtype, through torch.mm and through a
    1×1 convolution (the same product, done by the convolution library): the ceiling MFU is measured
    against. Best of `reps` each, since a shared machine's noise only ever slows a call down. (On AMD CPUs
    MKL's sgemm runs well below oneDNN's, hence both.)"""
    best = 0.0
    n = 512
    while n <= largest:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        x, w = a.view(1, n, n // 32, 32), b.view(n, n, 1, 1)
        for fn in (lambda: a @ b, lambda: torch.nn.functional.conv2d(x, w)):
            for _ in range(reps):
                best = max(best, 2 * n ** 3 / seconds_per_call(fn, device, 1, warmup=0))
        n *= 2
    return best


def training_step(name, backbone, size, batch, device, amp=None, channels_last=False, domain=None, compile=False):
    """A closure running one optimiser step on fixed random data. domain None: a phase-1 step; 'none',
    'backbone', 'multilevel': a phase-2 step (segmentation loss on the first half of the batch) without MMD,
    or with the MMD term between the two halves. compile: torch.compile the model (compiled in the first call)."""
    torch.manual_seed(0)
    model = models.build_model(name, backbone).to(device)
    w, h = size
    x = torch.randn(batch, 3, h, w, device=device)
    y = torch.randint(0, 19, (batch, h, w), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer, criterion = engine.adam(model.parameters(), 1e-4, device), SegLoss()  # as the scripts train
    if compile:
        torch._dynamo.reset()
        model = torch.compile(model)
    half = batch // 2

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if domain is None:
                loss = criterion(model(x), y)
            else:
                logits, taps = model(x, taps=True)
                s, t = {k: v[:half] for k, v in taps.items()}, {k: v[half:] for k, v in taps.items()}
                loss = criterion(logits[:half], y[:half])
                if domain == "backbone":
                    loss = loss + 0.01 * mmd(s["backbone"], t["backbone"])
                elif domain == "multilevel":
                    loss = loss + 0.01 * multilevel_mmd(s, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def step_flops(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def bench_model_steps(cfg, device, out):
    """Images/s of a bare training step per model and precision, FLOPs per step, MFU."""
    modes = {"fp32": (None, False, False), "fp32_channels_last": (None, True, False), "fp32_compile": (None, False, True),
             "bf16": (torch.bfloat16, False, False), "bf16_compile": (torch.bfloat16, False, True)}
    if device.type == "cuda":  # fp32 above is PyTorch's default there: TF32 convolutions; this one is plain fp32
        modes = {"fp32_no_tf32": (None, False, False), **modes}
    if cfg["no_compile"]:
        modes = {k: v for k, v in modes.items() if not k.endswith("_compile")}
    peaks = {"fp32": matmul_peak(device, torch.float32, cfg["matmul_n"])}
    if native_bf16(device) or cfg["force_bf16"]:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, cfg["matmul_n"])
    else:
        out["bf16_skipped"] = f"{device.type} without native bf16: emulated, ~30x slower than fp32 (--force-bf16 times it)"
        print(f"  bf16 modes skipped: {out['bf16_skipped']}", flush=True)
        modes = {k: v for k, v in modes.items() if not k.startswith("bf16")}
    out["matmul_peak_tflops"] = {k: v / 1e12 for k, v in peaks.items()}
    out["model_step"] = {}
    for name in ("unet", "deeplab"):  # the report's two (each compiled too: minutes on a CPU)
        flops = step_flops(training_step(name, cfg["backbone"], cfg["size"], cfg["batch"], device))
        row = {"gflops_per_step": flops / 1e9}
        for mode, (amp, cl, comp) in modes.items():
            step = training_step(name, cfg["backbone"], cfg["size"], cfg["batch"], device, amp, cl, compile=comp)
            tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            if mode == "fp32_no_tf32":
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            start = time.perf_counter()
            step()  # the warm-up: compiling, when compiled
            sync(device)
            first = time.perf_counter() - start
            t = seconds_per_call(step, device, cfg["iters"], warmup=0)
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            peak = peaks["bf16" if amp is not None else "fp32"]
            row[mode] = {"images_per_s": cfg["batch"] / t, "seconds_per_step": t, "mfu": flops / t / peak,
                         "first_step_seconds": first}
            print(f"  {name:8s} {mode:19s} {cfg['batch'] / t:7.2f} images/s  MFU {flops / t / peak:6.1%}"
                  f"  (first step {first:.1f} s)", flush=True)
        out["model_step"][name] = row
    d = out["model_step"]["deeplab"]
    out["train_mfu"] = d["fp32"]["mfu"]
    out["channels_last_speedup"] = d["fp32_channels_last"]["images_per_s"] / d["fp32"]["images_per_s"]
    if "fp32_compile" in d:
        out["compile_speedup"] = d["fp32_compile"]["images_per_s"] / d["fp32"]["images_per_s"]
    if "fp32_no_tf32" in d and "bf16" in d:
        out["bf16_over_fp32_no_tf32"] = d["bf16"]["images_per_s"] / d["fp32_no_tf32"]["images_per_s"]
    if "bf16" in d:
        out["bf16_speedup"] = d["bf16"]["images_per_s"] / d["fp32"]["images_per_s"]
        if "bf16_compile" in d:
            out["bf16_compile_speedup"] = d["bf16_compile"]["images_per_s"] / d["fp32"]["images_per_s"]


def bench_pipeline(cfg, device, tmp, out):
    """train_seg.py's own loop (loading, logging, everything but validation) over the bare step's speed,
    decoding PNGs and with --cache. Both are the best of several: the loop's fastest of epochs 2-4 (past
    worker start-up and the first step's warm-up), the bare step's fastest of six blocks of as many steps,
    three just before the loop and three just after. A shared machine only ever slows a run down, and its
    speed drifts within minutes: best against best, taken around the same time, is the fair ratio."""
    root = tmp / "pipeline"
    w, h = cfg["size"]
    n = cfg["pipeline_images"]
    steps = n // cfg["batch"]
    toy.make_toy(root, num_source=max(10, round(n / 0.6) + 1), num_target=10, source_size=(w * 2, h * 2),
                      target_size=(w, h))
    out["pipeline"] = {"workers": cfg["workers"]}
    step = training_step("deeplab", cfg["backbone"], cfg["size"], cfg["batch"], device)
    step()
    for key, extra in (("pipeline_efficiency", []), ("pipeline_efficiency_cached", ["--cache"])):
        run = tmp / f"pipeline_run{len(extra)}"
        cmd = [sys.executable, str(REPO / "train_seg.py"), "--model", "deeplab", "--backbone", cfg["backbone"],
               "--weights", "none", "--size", f"{w}x{h}", "--batch-size", str(cfg["batch"]), "--epochs", "4",
               "--train-limit", str(n), "--workers", str(cfg["workers"]), "--device", device.type,
               "--gta5-root", str(root / "gta5"), "--cityscapes-root", str(root / "cityscapes"), "--out", str(run),
               "--amp", "off", *extra]  # fp32, as the bare step it is compared with
        blocks = [seconds_per_call(step, device, steps, warmup=0) for _ in range(3)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"train_seg.py failed in the pipeline benchmark:\n{r.stderr}")
        blocks += [seconds_per_call(step, device, steps, warmup=0) for _ in range(3)]
        bare = cfg["batch"] / min(blocks)
        with open(run / "metrics.csv") as f:
            epochs = list(csv.DictReader(f))[1:]
        loop = steps * cfg["batch"] / min(float(row["train_seconds"]) for row in epochs)
        out["pipeline"][key] = {"loop_images_per_s": loop, "bare_step_images_per_s": bare,
                                "bare_step_images_per_s_range": [cfg["batch"] / max(blocks), bare]}
        out[key] = loop / bare
        print(f"  train_seg.py loop{' --cache' if extra else ''}: {loop:.2f} images/s vs bare step {bare:.2f} "
              f"(its blocks: {cfg['batch'] / max(blocks):.2f}-{bare:.2f}): {loop / bare:.1%}", flush=True)


def project_protocol(out):
    """Hours of the report's protocol at the measured speeds: phase 1, 25 epochs of 12,500 GTA-V images;
    phase 2, 10 epochs of 3,125 steps of 4 + 4 images. Training steps only (no validation, no loading)."""
    d = out["model_step"]["deeplab"]
    phase2_vs_phase1 = out["mmd"]["multilevel"]["images_per_s"] / d["fp32"]["images_per_s"]
    out["protocol_hours"] = {}
    for mode, r in d.items():
        if isinstance(r, dict):
            p1 = 25 * 12500 / r["images_per_s"] / 3600
            p2 = 10 * 3125 * 8 / (r["images_per_s"] * phase2_vs_phase1) / 3600
            out["protocol_hours"][mode] = {"phase1": p1, "phase2": p2}
    best = min(out["protocol_hours"], key=lambda m: out["protocol_hours"][m]["phase1"])
    h = out["protocol_hours"][best]
    c = out["config"]
    print(f"  the report's protocol at these speeds ({c['backbone']}, {c['size']}, batch {c['batch']}, {best}): phase 1 {h['phase1']:.1f} h (the report: ~18 h on an "
          f"Apple M4), phase 2 {h['phase2']:.1f} h; training steps only", flush=True)


def bench_loading(cfg, tmp, out):
    """Decoding GTA-V-sized PNGs (1914x1052) and resizing to the training size, against --cache."""
    root = tmp / "gta_res"
    toy.make_toy(root, num_source=cfg["loader_images"], num_target=10, source_size=(1914, 1052),
                      target_size=(256, 128))
    pairs, _ = datasets.gta5_pairs(root / "gta5")
    items = [(k, *v, False) for k, v in pairs.items()]
    png = datasets.SegDataset(items, size=cfg["size"])
    t_png = seconds_per_call(lambda: [png[i] for i in range(len(png))], torch.device("cpu"), 1)
    cached = datasets.SegDataset(items, size=cfg["size"])
    start = time.perf_counter()
    cached.use_cache(tmp / "cache")
    build = time.perf_counter() - start
    t_cache = seconds_per_call(lambda: [cached[i] for i in range(len(cached))], torch.device("cpu"), 3)
    same = all(torch.equal(a, b) for i in range(len(png)) for a, b in zip(png[i], cached[i]))
    if not same:
        raise RuntimeError("the cached loader returned other tensors than the PNG loader")
    out["loading"] = {"png_images_per_s": len(png) / t_png, "cached_images_per_s": len(png) / t_cache,
                      "cache_build_seconds": build, "images": len(png), "source": "1914x1052 PNG"}
    out["cache_speedup"] = t_png / t_cache
    print(f"  PNG {len(png) / t_png:.1f} images/s, cached {len(png) / t_cache:.1f} images/s "
          f"({t_png / t_cache:.1f}x; building the cache took {build:.1f} s)", flush=True)


def bench_metric(cfg, tmp, out):
    """Our confusion matrix against cityscapesscripts' pixel-level evaluation, same prediction files."""
    import warnings
    official = cityscapes_evaluation()
    root = tmp / "eval"
    toy.make_toy(root, num_source=10, num_target=4 * cfg["eval_images"], source_size=(96, 53),
                      target_size=(2048, 1024))  # a quarter of the target images land in val
    gts = sorted(glob.glob(str(root / "cityscapes" / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")))
    preds_dir = tmp / "preds"
    preds_dir.mkdir()
    rng = np.random.default_rng(0)
    preds = []
    for g in gts:  # the ground truth with a fifth of the pixels changed to a random class
        ids = np.asarray(Image.open(g)).copy()
        flip = rng.random(ids.shape) < 0.2
        ids[flip] = datasets.TRAINID_TO_ID[rng.integers(0, 19, int(flip.sum()))]
        p = preds_dir / (Path(g).name.split("_gtFine_")[0] + "_pred_labelIds.png")
        Image.fromarray(ids).save(p)
        preds.append(str(p))

    def ours():
        cm = ConfusionMatrix()
        for p, g in zip(preds, gts):
            cm.update(torch.from_numpy(datasets.read_label(g, None)).long(),
                      torch.from_numpy(datasets.read_label(p, None)).long())
        return cm.compute()[1]

    def theirs():
        official.args.quiet, official.args.JSONOutput = True, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return official.evaluateImgLists(preds, gts, official.args)["averageScoreClasses"]

    start = time.perf_counter()
    miou_ours = ours()
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    miou_theirs = theirs()
    t_theirs = time.perf_counter() - start
    if abs(miou_ours - miou_theirs) > 1e-9:
        raise RuntimeError(f"mIoU differs from cityscapesscripts': {miou_ours} vs {miou_theirs}")
    out["metric"] = {"ours_images_per_s": len(gts) / t_ours, "cityscapesscripts_images_per_s": len(gts) / t_theirs,
                     "miou_ours": miou_ours, "miou_cityscapesscripts": miou_theirs, "images": len(gts),
                     "resolution": "2048x1024"}
    out["eval_speedup"] = t_theirs / t_ours
    print(f"  metric: ours {len(gts) / t_ours:.1f} images/s, cityscapesscripts {len(gts) / t_theirs:.1f} "
          f"images/s ({t_theirs / t_ours:.1f}x); mIoU {miou_ours:.6f} both", flush=True)


def bench_mmd(cfg, device, out):
    """Share of a phase-2 step (DeepLabV3, half source, half target) spent on the MMD term: the term's own
    forward and backward, timed alone on the step's embeddings, over the whole step's time (a difference
    of two step times would drown in the noise of a shared machine)."""
    torch.manual_seed(0)
    model = models.build_model("deeplab", cfg["backbone"]).to(device)
    w, h = cfg["size"]
    with torch.no_grad():
        _, taps = model(torch.randn(cfg["batch"], 3, h, w, device=device), taps=True)
    half = cfg["batch"] // 2

    def term(multilevel):
        s = {k: v[:half].clone().requires_grad_() for k, v in taps.items()}
        t = {k: v[half:].clone().requires_grad_() for k, v in taps.items()}
        (multilevel_mmd(s, t) if multilevel else mmd(s["backbone"], t["backbone"])).backward()

    out["mmd"] = {}
    for key, level in (("mmd_share", "backbone"), ("mmd_share_multilevel", "multilevel")):
        step = seconds_per_call(training_step("deeplab", cfg["backbone"], cfg["size"], cfg["batch"], device,
                                              domain=level), device, cfg["iters"])
        alone = seconds_per_call(lambda: term(level == "multilevel"), device, 10)
        out["mmd"][level] = {"step_seconds": step, "mmd_seconds": alone, "images_per_s": cfg["batch"] / step}
        out[key] = alone / step
    print(f"  MMD share of a phase-2 step: backbone {out['mmd_share']:.2%}, multilevel "
          f"{out['mmd_share_multilevel']:.2%}", flush=True)


def peak_rss_mb():
    """Peak resident memory of this process. Linux: VmHWM (ru_maxrss survives exec, so a child would
    report its parent's peak); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def memory_probe(cfg, device):
    """Run in a fresh process: peak memory of a DeepLabV3 training step, in MB."""
    before = peak_rss_mb()
    step = training_step("deeplab", cfg["backbone"], cfg["size"], cfg["batch"], device)
    step()
    step()
    sync(device)
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20, "kind": "cuda allocated"}
    if device.type == "mps":
        return {"peak_memory_mb": torch.mps.driver_allocated_memory() / 2 ** 20, "kind": "mps driver"}
    peak = peak_rss_mb()
    return {"peak_memory_mb": peak - before, "kind": "process peak RSS above the imports",
            "process_peak_rss_mb": peak, "rss_before_model_mb": before}


CONFIGS = {
    "quick": {"backbone": "resnet18", "size": (256, 128), "batch": 4, "iters": 2, "matmul_n": 2048,
              "pipeline_images": 48, "loader_images": 12, "eval_images": 4},
    "full": {"backbone": "resnet50", "size": (480, 256), "batch": 8, "iters": 3, "matmul_n": 4096,
             "pipeline_images": 64, "loader_images": 48, "eval_images": 12},
}


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet18, 256x128, batch 4: for CI-sized machines")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="override the configuration's batch")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 also where the CPU only emulates it")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader workers of the train_seg.py loop (default: as train_seg.py's, %(default)s here)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile modes (minutes each)")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    return p


def main(args):
    cfg = dict(CONFIGS["quick" if args.quick else "full"], force_bf16=args.force_bf16, workers=args.workers,
               no_compile=args.no_compile)
    if args.batch_size is not None:
        if args.batch_size < 2:
            raise UserError(f"--batch-size {args.batch_size}: must be at least 2")
        cfg["batch"] = args.batch_size
    device = pick_device(args.device)
    if args.memory_probe:
        print(json.dumps(memory_probe(cfg, device)))
        return
    w, h = cfg["size"]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
           "threads": torch.get_num_threads(), "config": {**cfg, "size": f"{w}x{h}"},
           "torch": torch.__version__, "quick": args.quick}
    print(f"bench on {out['device']} ({out['threads']} threads): {cfg['backbone']}, {w}x{h}, batch {cfg['batch']}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        bench_model_steps(cfg, device, out)
        bench_pipeline(cfg, device, tmp, out)
        bench_loading(cfg, tmp, out)
        try:
            bench_metric(cfg, tmp, out)
        except ImportError as e:  # no cityscapesscripts (the lent GPU machines reach no registry)
            out["metric_skipped"] = f"cityscapesscripts' evaluation does not run here ({type(e).__name__}: {e})"
            print(f"  metric comparison skipped: {out['metric_skipped']}", flush=True)
        bench_mmd(cfg, device, out)
        project_protocol(out)
    probe = [sys.executable, str(REPO / "bench.py"), "--memory-probe", "--device", device.type]
    probe += ["--quick"] if args.quick else []
    probe += ["--batch-size", str(cfg["batch"])]
    mem = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    out["memory"] = mem
    out["peak_memory_mb"] = mem["peak_memory_mb"]
    print(f"  peak memory of a DeepLabV3 training step: {mem['peak_memory_mb']:.0f} MB ({mem['kind']})", flush=True)
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(out, indent=1)), mode="w")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
