"""Which adaptation method works on the built-in pair, and by how much? One command:

    python bench_adapt.py                     # 48 training runs, two at a time: see the README for how long
    python bench_adapt.py --seeds 0           # a first look: one seed
    python bench_adapt.py --out runs/adapt    # run it again to continue where it stopped

It trains, with the real scripts, for each model: a source-only model (phase 1), a target oracle (phase 1
on target labels: the upper bound), then phase 2 from the source-only model for the report's 10 epochs: a
lam-0 control (the same steps and batches with no target term, so that a method is told apart from simply
training longer) and each method alone at a default weight, 3 seeds each. DeepLabV3 runs every method, then
all the methods whose mean beats the control together (when two or more do). DeepLabV3+ and U-Net run the
control, MMD and DeepLabV3's best row. Figures are last-epoch (no model is selected with target labels);
choosing the combination and the best row does use target labels, and the table says so. OUT/results.md
gets the tables.
"""
import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils import ArgumentParser, UserError, atomic_write, run_main

REPO = Path(__file__).resolve().parent
# (name, what the table calls it, train_mmd.py flags besides --lam); MMD's --lam comes from MMD_LAM
METHODS = [
    ("control", "control (lam 0)", []),
    ("mmd", "MMD (lam 0.05, multilevel)", ["--multilevel"]),
    ("ent", "entropy minimisation (0.1)", ["--ent", "0.1"]),
    ("pseudo", "self-training (1.0, EMA 0.99)", ["--pseudo", "1"]),
    ("fda", "FDA (beta 0.05)", ["--fda", "0.05"]),
    ("adv", "output-space adversarial (0.001)", ["--adv", "0.001"]),
    ("aug", "augmentation (scale, crop, colour)", ["--aug"]),
]
MMD_LAM = "0.05"  # the adaptation benchmark's best MMD weight on this pair (lam 0.01 moved nothing)
SUBSET_MODELS = ("deeplabv3plus", "unet")


def run(cmds, jobs):
    """Run the training commands, `jobs` at a time, each with its share of the CPU threads: small models on a
    few cores use threads badly, so two 1-thread runs on 2 cores do more than one 2-thread run. With more
    than one job, a run's output goes to a .log beside its directory (its tail is shown if it fails).
    Ctrl-C (or SIGTERM) stops the runs in progress, each saving its checkpoint, before this process ends."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // jobs))} if jobs > 1 else None
    pending, running, failure = list(cmds), [], None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while running or (pending and failure is None):
            while pending and len(running) < jobs and failure is None:
                cmd = pending.pop(0)
                print("$ python " + " ".join(cmd), flush=True)
                log = Path(cmd[cmd.index("--out") + 1] + ".log") if jobs > 1 else None
                try:
                    if log:
                        log.parent.mkdir(parents=True, exist_ok=True)
                    out = open(log, "a") if log else None
                    # a session of its own: the terminal's Ctrl-C reaches this process alone, which passes it
                    # on once (a second one ends a run at once, without its checkpoint)
                    running.append((cmd, subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=out,
                                                          stderr=subprocess.STDOUT if out else None,
                                                          start_new_session=True), out, log))
                except OSError as e:
                    failure = f"{log or cmd[0]}: {e.strerror or e}"
            time.sleep(0.2)
            for entry in [e for e in running if e[1].poll() is not None]:
                running.remove(entry)
                cmd, proc, out, log = entry
                if out:
                    out.close()
                if proc.returncode != 0 and failure is None:
                    if log:
                        print("".join(log.read_text(errors="replace").splitlines(True)[-20:]), end="")
                    failure = (f"{cmd[0]} failed (exit {proc.returncode}{f'; log: {log}' if log else ''}); fix the "
                               "cause above and run again to continue")
                    if running:
                        print(f"waiting for the {len(running)} run(s) in progress", flush=True)
    except KeyboardInterrupt:
        print(f"stopping {len(running)} run(s); each saves its checkpoint first (Ctrl-C again: do not wait)",
              file=sys.stderr, flush=True)
        for _, proc, _, _ in running:
            proc.send_signal(signal.SIGINT)
        for _, proc, _, _ in running:
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        raise UserError(failure)


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: float(v) if v else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]


def finished(run_dir, cmd):
    """Whether run_dir holds this very command's run (args.json's argv), to its last epoch."""
    try:
        argv = json.loads((Path(run_dir) / "args.json").read_text())["argv"]
        return argv == cmd and int(rows(run_dir)[-1]["epoch"]) >= int(cmd[cmd.index("--epochs") + 1])
    except (OSError, KeyError, IndexError, ValueError, TypeError):
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
        self.common = ["--toy", "--size", args.size, "--amp", args.amp, "--channels-last", "--resume"]
        self.queue, self.seconds = [], 0.0

    def train(self, run_dir, cmd, epochs):
        cmd = [*cmd, "--out", str(run_dir), "--epochs", str(epochs)]
        # a finished run of other settings runs again: --resume refuses it if they must match, or goes on
        if not finished(run_dir, cmd) and cmd not in self.queue:
            self.queue.append(cmd)

    def flush(self):
        """Train what was queued since the last flush: runs that need none of each other's results."""
        started, queue, self.queue = time.time(), self.queue, []
        if queue:
            run(queue, self.args.jobs)
            self.seconds += time.time() - started

    def phase1(self, model):
        cmd = ["train_seg.py", "--model", model, *self.common, "--backbone", self.args.backbone, "--weights", "none"]
        self.train(self.out / model / "source_only", cmd, self.args.epochs1)
        self.train(self.out / model / "oracle", [*cmd, "--train-on", "cityscapes"], self.args.epochs1)

    def phase2(self, model, runs, seed):
        """Queue phase 2 from the source-only model; runs: [(name, methods)]."""
        init = str(self.out / model / "source_only" / "best.pt")
        for name, methods in runs:
            cmd = ["train_mmd.py", "--model", model, *self.common, "--init", init, *flags_of(methods),
                   "--seed", str(seed)]
            self.train(self.out / model / f"{name}_seed{seed}", cmd, self.args.epochs2)

    def results(self, model, names):
        """{name: [last metrics row of each seed]}"""
        return {name: [rows(self.out / model / f"{name}_seed{seed}")[-1] for seed in self.args.seeds]
                for name in names}

    def table(self, model, labels, results):
        """Markdown rows: source only, oracle, then each run's mean (± std) over seeds."""
        before = rows(self.out / model / f"control_seed{self.args.seeds[0]}")[0]  # phase 2's epoch 0
        t0, oracle = before["target_val_miou"], rows(self.out / model / "oracle")[-1]["val_miou"]
        control = statistics.mean(r["target_val_miou"] for r in results["control"])
        lines = ["| run | source val mIoU | target val mIoU | vs control | gap closed |", "|---|---|---|---|---|",
                 f"| source only (phase 1) | {before['source_val_miou']:.4f} | {t0:.4f} | | 0% |",
                 f"| target oracle (phase 1 on target labels) | | {oracle:.4f} | | 100% |"]
        for name, label in labels:
            target = statistics.mean(r["target_val_miou"] for r in results[name])
            lines.append(f"| {label} | {pm([r['source_val_miou'] for r in results[name]])} | "
                         f"{pm([r['target_val_miou'] for r in results[name]])} | {target - control:+.4f} | "
                         f"{(target - t0) / (oracle - t0):.0%} |")
        return lines

    def main(self):
        args, started = self.args, time.time()
        label = {name: text for name, text, _ in METHODS}
        seeds = ", ".join(map(str, args.seeds))
        report = [f"{args.backbone}, {args.size}, --amp {args.amp}, channels_last; phase 1 {args.epochs1} epochs, "
                  f"phase 2 {args.epochs2} epochs; last-epoch figures, " + (f"mean ± std over seeds {seeds}" if
                  len(args.seeds) > 1 else f"seed {seeds}") + ". Gap closed = (target - source only) / (oracle - "
                  "source only); vs control = target - the control's mean target.", ""]
        # rounds of runs that need none of each other's results: phase 1; the methods alone (and the subset
        # models' control and MMD); the combination; the subset models' best row. Seed by seed, so that an
        # interrupted benchmark has every method's first seeds.
        for model in ("deeplab", *SUBSET_MODELS):
            self.phase1(model)
        self.flush()
        for seed in args.seeds:
            self.phase2("deeplab", [(name, [name]) for name, _, _ in METHODS], seed)
            for model in SUBSET_MODELS:
                self.phase2(model, [("control", ["control"]), ("mmd", ["mmd"])], seed)
        self.flush()
        results = self.results("deeplab", [name for name, _, _ in METHODS])
        mean = {name: statistics.mean(r["target_val_miou"] for r in rs) for name, rs in results.items()}
        helpful = [name for name, _, _ in METHODS[1:] if mean[name] > mean["control"]]
        labels = [(name, label[name]) for name, _, _ in METHODS]
        if len(helpful) >= 2:
            combo = "combo_" + "+".join(helpful)
            for seed in args.seeds:
                self.phase2("deeplab", [(combo, helpful)], seed)
            self.flush()
            results.update(self.results("deeplab", [combo]))
            mean[combo] = statistics.mean(r["target_val_miou"] for r in results[combo])
            label[combo] = "together: " + " + ".join(helpful) + " (the methods that beat the control, chosen " \
                                                                  "with target labels)"
            labels.append((combo, label[combo]))
            note = ""
        else:
            note = (f"Only {helpful[0]} beat the control" if helpful else "No method beat the control") + \
                   ": no combination to run."
        best = max((name for name in mean if name != "control"), key=mean.get)
        names = ["control", "mmd"]
        if best != "mmd":
            names.append(best)
            for seed in args.seeds:
                for model in SUBSET_MODELS:
                    self.phase2(model, [(best, helpful if best.startswith("combo_") else [best])], seed)
            self.flush()
        report += ["### DeepLabV3", "", *self.table("deeplab", labels, results), "", note, ""]
        for model in SUBSET_MODELS:
            labels = [(name, label[name] + (" (DeepLabV3's best row)" if name == best else "")) for name in names]
            title = "DeepLabV3+" if model == "deeplabv3plus" else "U-Net"
            report += [f"### {title}", "", *self.table(model, labels, self.results(model, names)), ""]
        report.append(f"Training took {self.seconds / 60:.0f} min in this invocation, {args.jobs} run(s) at a time "
                      f"({(time.time() - started) / 60:.0f} min in all).")
        text = "\n".join(report) + "\n"
        atomic_write(self.out / "results.md", lambda f: f.write(text), mode="w")
        print("\n" + text + f"\nwrote {self.out / 'results.md'}")


def pm(values):
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/adapt")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", default="96x48", help="(default: %(default)s, to fit in about 2 hours on 2 cores)")
    p.add_argument("--epochs1", type=int, default=15, help="phase-1 epochs (default: %(default)s)")
    p.add_argument("--epochs2", type=int, default=10, help="phase-2 epochs (default: the report's %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="phase-2 seeds (default: 0 1 2)")
    p.add_argument("--amp", default="off", help="bf16 is faster only on CPUs with native bf16 (AVX512-BF16, AMX)")
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs at a time, sharing the CPU threads (default: 2 on the CPU, 1 on a GPU)")
    return p


def main(args):
    if args.jobs is None:
        args.jobs = 1 if torch.cuda.is_available() or torch.backends.mps.is_available() else 2
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give 1 or more training runs at a time")
    Bench(args).main()


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
