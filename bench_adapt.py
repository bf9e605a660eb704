"""Which adaptation method works on the built-in pair, and by how much? One command:

    python bench_adapt.py                     # about 2 hours on 2 CPU cores
    python bench_adapt.py --out runs/adapt    # run it again to continue where it stopped

It trains, with the real scripts, for each model: a source-only model (phase 1), a target oracle (phase 1
on target labels: the upper bound), then phase 2 from the source-only model for the report's 10 epochs: a
lam-0 control (the same steps and batches with no target term, so that a method is told apart from simply
training longer) and each method alone at a default weight, 3 seeds each. DeepLabV3 runs every method; the
best combination joins the methods whose mean beats the control. DeepLabV3+ and U-Net run the control, MMD
and DeepLabV3's best row. Figures are last-epoch (no model is selected with target labels); choosing the
combination and the best row does use target labels, and the table says so. OUT/results.md gets the tables.
"""
import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

from utils import ArgumentParser, UserError, atomic_write, run_main

REPO = Path(__file__).resolve().parent
# (name, what the table calls it, train_mmd.py flags besides --lam); MMD's --lam comes from MMD_LAM
METHODS = [
    ("control", "control (lam 0)", []),
    ("mmd", "MMD (lam 0.05, multilevel)", ["--multilevel"]),
    ("ent", "entropy minimisation (0.1)", ["--ent", "0.1"]),
    ("st", "self-training (1.0, EMA 0.99)", ["--st", "1"]),
    ("fda", "FDA (beta 0.05)", ["--fda", "0.05"]),
    ("adv", "output-space adversarial (0.001)", ["--adv", "0.001"]),
    ("aug", "augmentation (scale, crop, colour)", ["--aug"]),
]
MMD_LAM = "0.05"  # the adaptation benchmark's best MMD weight on this pair (lam 0.01 moved nothing)
SUBSET_MODELS = ("deeplabv3plus", "unet")


def run(cmd):
    print("$ python " + " ".join(cmd), flush=True)
    started = time.time()
    r = subprocess.run([sys.executable, *cmd], cwd=REPO)
    if r.returncode != 0:
        raise UserError(f"{cmd[0]} failed (exit {r.returncode}); fix the cause above and run again to continue")
    return time.time() - started


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: float(v) if v else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]


def finished(run_dir, epochs):
    try:
        return int(rows(run_dir)[-1]["epoch"]) >= epochs
    except (OSError, KeyError, IndexError, ValueError):
        return False


def flags_of(names):
    """train_mmd.py flags for a set of methods run together."""
    flags = ["--lam", MMD_LAM if "mmd" in names else "0"]
    for name, _, method_flags in METHODS:
        if name in names:
            flags += method_flags
    return flags


class Bench:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.common = ["--toy", "--size", args.size, "--amp", args.amp, "--resume"]
        self.seconds = 0.0

    def train(self, run_dir, cmd, epochs):
        if not finished(run_dir, epochs):
            self.seconds += run([*cmd, "--out", str(run_dir), "--epochs", str(epochs)])

    def phase1(self, model):
        cmd = ["train_seg.py", "--model", model, *self.common, "--backbone", self.args.backbone, "--weights", "none"]
        self.train(self.out / model / "source_only", cmd, self.args.epochs1)
        self.train(self.out / model / "oracle", [*cmd, "--train-on", "cityscapes"], self.args.epochs1)

    def phase2(self, model, name, methods, seed):
        run_dir = self.out / model / f"{name}_seed{seed}"
        cmd = ["train_mmd.py", "--model", model, *self.common, "--init", str(self.out / model / "source_only" / "best.pt"),
               *flags_of(methods), "--seed", str(seed)]
        self.train(run_dir, cmd, self.args.epochs2)
        return rows(run_dir)[-1]

    def model_rows(self, model, runs):
        """runs: [(name, label, methods)] -> table lines and {name: mean target val}."""
        self.phase1(model)
        results = {name: [] for name, _, _ in runs}
        for seed in self.args.seeds:  # seed by seed: an interrupted benchmark has every method's first seeds
            for name, _, methods in runs:
                results[name].append(self.phase2(model, name, methods, seed))
        before = rows(self.out / model / "control_seed0")[0]  # phase 2's epoch 0: the source-only model
        t0 = before["target_val_miou"]
        oracle = rows(self.out / model / "oracle")[-1]["val_miou"]
        control = statistics.mean(r["target_val_miou"] for r in results["control"])
        source_control = statistics.mean(r["source_val_miou"] for r in results["control"])
        lines = [f"| source only (phase 1) | {before['source_val_miou']:.4f} | {t0:.4f} | | 0% |",
                 f"| target oracle (phase 1 on target labels) | | {oracle:.4f} | | 100% |"]
        means = {}
        for name, label, _ in runs:
            src = [r["source_val_miou"] for r in results[name]]
            tgt = [r["target_val_miou"] for r in results[name]]
            means[name] = statistics.mean(tgt)
            lines.append(f"| {label} | {pm(src)} | {pm(tgt)} | {means[name] - control:+.4f} | "
                         f"{(means[name] - t0) / (oracle - t0):.0%} |")
        lines.append(f"\nSource val of the control: {source_control:.4f}; gap = oracle - source only = "
                     f"{oracle - t0:.4f}.")
        return lines, means

    def main(self):
        args, started = self.args, time.time()
        header = ["| run | source val mIoU | target val mIoU | vs control | gap closed |", "|---|---|---|---|---|"]
        report = [f"{args.backbone}, {args.size}, {args.amp}; phase 1 {args.epochs1} epochs, phase 2 {args.epochs2} "
                  f"epochs; mean ± std over seeds {', '.join(map(str, args.seeds))} of the last epoch's figures. Gap "
                  "closed = (target - source only) / (oracle - source only); vs control = target - the control's "
                  "mean.", ""]
        singles = [(n, label, [n]) for n, label, _ in METHODS]
        lines, means = self.model_rows("deeplab", singles)
        helpful = [n for n, _, _ in METHODS[1:] if means[n] > means["control"]]
        combo = helpful or [max(means, key=means.get)]
        label = "best combination: " + " + ".join(combo) + " (methods chosen with target labels)"
        combo_lines, combo_means = self.model_rows("deeplab", [("control", "", ["control"]), ("combo", label, combo)])
        means["combo"] = combo_means["combo"]
        report += ["### DeepLabV3", "", *header, *lines[:-1], combo_lines[-2], lines[-1], ""]
        best = max((n for n in means if n != "control"), key=means.get)
        best_label = dict((n, l) for n, l, _ in METHODS).get(best, label)
        best_methods = combo if best == "combo" else [best]
        for model in SUBSET_MODELS:
            runs = [METHODS[0][:2] + (["control"],), METHODS[1][:2] + (["mmd"],)]
            if best != "mmd":
                runs.append((best, f"DeepLabV3's best: {best_label}", best_methods))
            lines, _ = self.model_rows(model, runs)
            report += [f"### {'DeepLabV3+' if model == 'deeplabv3plus' else 'U-Net'}", "", *header, *lines, ""]
        minutes = (time.time() - started) / 60
        report.append(f"Training took {self.seconds / 60:.0f} min in this invocation ({minutes:.0f} min in all).")
        text = "\n".join(report) + "\n"
        atomic_write(self.out / "results.md", lambda f: f.write(text), mode="w")
        print("\n" + text + f"\nwrote {self.out / 'results.md'}")


def pm(values):
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/adapt")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", default="192x96")
    p.add_argument("--epochs1", type=int, default=15, help="phase-1 epochs (default: %(default)s)")
    p.add_argument("--epochs2", type=int, default=10, help="phase-2 epochs (default: the report's %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="phase-2 seeds (default: 0 1 2)")
    p.add_argument("--amp", default="off", help="bf16 is faster only on CPUs with native bf16 (AVX512-BF16, AMX)")
    Bench(p.parse_args()).main()


if __name__ == "__main__":
    run_main(main)
