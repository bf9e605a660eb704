"""What .ci/gpu runs, each part in its own process, every figure into one JSON (see .ci/gpu for the why).

    python .ci/gpu_check.py [--full] [--json FILE]
"""
import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402  (after the path: the checks import the repository's modules)

from utils import ArgumentParser, run_main  # noqa: E402


def readme_main_job():
    """The python steps of the README's first command, as lists of arguments."""
    line = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()[0]
    return [shlex.split(step)[1:] for step in line.split(" && ") if step.startswith("python ")]


def main_job_figures(text):
    """Source and target val mIoU before adaptation and at the last epoch, from train_mmd.py's closing table."""
    found = {}
    for key, label in (("before", r"before adaptation"), ("last", r"last epoch \(\d+\)")):
        m = re.search(rf"^{label}\s+([\d.]+)\s+([\d.]+)", text, re.M)
        if m:
            found[f"{key}_source_val_miou"], found[f"{key}_target_val_miou"] = float(m[1]), float(m[2])
    return found


def torchrun_skipped(gpus):
    """Why the torchrun part cannot run with this many GPUs (None: it runs, two processes on NCCL)."""
    if gpus < 2:
        return (f"{gpus} GPU here: NCCL takes one GPU per process, so DDP, BatchNorm over processes and the cache "
                "barrier need two; the CPU tests run them with gloo")
    return None


def run(name, argv, timeout, results, out):
    """argv from the repository root, its output kept in OUT/NAME.log; rc and seconds recorded in results."""
    print(f"== {name}: {' '.join(map(str, argv))}", flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w+") as log:
        try:
            rc = subprocess.run(list(map(str, argv)), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout} s"
        log.seek(0)
        text = log.read()
    results[name] = {"rc": rc, "seconds": round(time.time() - start, 1)}
    print("".join(text.splitlines(True)[-8:]) + f"-- {name}: rc {rc}, {results[name]['seconds']} s", flush=True)
    return text


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="add --compile against eager and the compiled bench rows")
    p.add_argument("--json", default=str(Path(os.environ.get("OUT", ".")) / "gpu.json"),
                   help="where the figures go (default: $OUT/gpu.json, else ./gpu.json)")
    return p


def main(args):
    if not torch.cuda.is_available():
        print("no CUDA GPU here: .ci/gpu checks nothing on this machine (it runs on one with a GPU)")
        return
    out = Path(args.json).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    py, gpus = sys.executable, torch.cuda.device_count()
    runs_dir = f"runs/gpu_check/{time.strftime('%Y%m%d-%H%M%S')}"  # a folder of its own each time: no run is reused
    report = {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
              "gpus": gpus, "torch": torch.__version__, "runs": {}}
    runs = report["runs"]
    run("cuda_tests", [py, "-m", "pytest", "-q", "tests", "-m", "gpu", "--slow", "-p", "no:cacheprovider"], 180,
        runs, out)
    text = ""
    for i, argv in enumerate(readme_main_job()):
        text = run(f"main_job_{i + 1}", [py, *argv, "--device", "cuda", "--out", f"{runs_dir}/main{i + 1}",
                                         *(["--init", f"{runs_dir}/main1/best.pt"] if i else [])], 240, runs, out)
    report["main_job"] = main_job_figures(text)
    bench = out / "bench.json"
    run("bench", [py, "bench.py", "--json", bench, *([] if args.full else ["--no-compile"])], 420, runs, out)
    if bench.exists():
        b = json.loads(bench.read_text())
        report["bench"] = {k: b.get(k) for k in ("bf16_over_fp32_no_tf32", "bf16_speedup", "channels_last_speedup",
                                                 "compile_speedup", "train_mfu", "pipeline_efficiency",
                                                 "pipeline_efficiency_cached", "peak_memory_mb", "metric_skipped")}
        hours = b.get("protocol_hours", {})
        best = min(hours, key=lambda m: hours[m]["phase1"] + hours[m]["phase2"]) if hours else None
        report["bench"]["protocol_hours"] = {"mode": best, **hours.get(best, {})}
    common = ["--toy", "--model", "deeplab", "--size", "256x128", "--epochs", "1", "--device", "cuda"]
    report["skipped"] = {}
    if torchrun_skipped(gpus):
        report["skipped"]["torchrun"] = torchrun_skipped(gpus)
        print(f"-- torchrun: skipped: {torchrun_skipped(gpus)}", flush=True)
    else:
        launch = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        run("torchrun_phase1", [*launch, "train_seg.py", *common, "--backbone", "resnet18", "--weights", "none",
                                "--out", f"{runs_dir}/ddp_seg"], 240, runs, out)
        run("torchrun_phase2", [*launch, "train_mmd.py", *common, "--lam", "0.05", "--multilevel", "--init",
                                f"{runs_dir}/ddp_seg/best.pt", "--out", f"{runs_dir}/ddp_mmd"], 240, runs, out)
    if args.full:
        for mode in ("eager", "compile"):
            run(f"phase1_{mode}", [py, "train_seg.py", *common, "--backbone", "resnet18", "--weights", "none",
                                   "--epochs", "2", "--deterministic", "--out", f"{runs_dir}/{mode}",
                                   *(["--compile"] if mode == "compile" else [])], 300, runs, out)
        losses = {}
        for mode in ("eager", "compile"):
            metrics = REPO / runs_dir / mode / "metrics.csv"
            if metrics.exists():
                with open(metrics) as f:
                    losses[mode] = [float(row["train_loss"]) for row in csv.DictReader(f)]
        report["compile_train_loss"] = losses
        if len(losses) == 2:  # fused kernels round differently: the same training within 2%, not bit for bit
            report["compile_matches_eager"] = all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(*losses.values()))
            if not report["compile_matches_eager"]:
                runs["phase1_compile"]["rc"] = "its losses differ from eager's by more than 2%"
    report["failed"] = [name for name, r in runs.items() if r["rc"] != 0]
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    if report["failed"]:
        sys.exit(f"failed: {', '.join(report['failed'])} (their logs are beside {args.json})")


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
