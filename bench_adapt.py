"""Which adaptation method works on the built-in pair, and by how much? One command:

    python bench_adapt.py --amp bf16          # the README's tables; plain `python bench_adapt.py` picks the
                                              # precision for the machine (an --out begun under another --amp
                                              # is refused: continue it with the --amp it began with)
    python bench_adapt.py --seeds 0           # a first look: one seed
    python bench_adapt.py --out runs/adapt    # run it again to continue where it stopped

It makes its own built-in pair (OUT/data, --num-source + --num-target images) and trains with the real
scripts, for each model and seed: a source-only model (phase 1), a target oracle (phase 1 on target labels:
the upper bound), and from the source-only model phase 2 for
the report's 10 epochs: the lam-0 control (the same steps and batches with no target term, so that a method
is told apart from simply training longer) under each --bn mode, and the methods at a default weight under
the default --bn. It scores the source-only model with AdaBN too (evaluate.py --adabn).

DeepLabV3 runs every row: source-only, AdaBN, oracle, the controls, MMD, DACS and DACS with rare class
sampling over all seeds, every other method on the first seed, then the best method (chosen on the first seed
with target labels) on all seeds. U-Net runs all but the other methods over all seeds; DeepLabV3+ the same
rows on the first seed only. Figures are last-epoch (phase 2 starts from the source-only model of the best source val
epoch, as the report; no model is chosen with target labels). OUT/results.md gets the tables.
"""
import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from batchnorm import BN_MODES, DEFAULT_MODE as DEFAULT_BN
from engine import TEXT_COLUMNS
from files import atomic_write
from utils import AMP_MODES, ArgumentParser, UserError, available_cpus, pick_device, resolve_amp, run_main

REPO = Path(__file__).resolve().parent
# (name, train_mmd.py flags besides --lam and --bn; MMD's --lam comes from MMD_LAM): the table names each row by the
# methods' own declarations (train_mmd.py's Methods.describe)
METHODS = [
    ("mmd", ["--multilevel"]),
    ("ent", ["--ent", "0.1"]),
    ("fda", ["--fda", "0.05"]),
    ("adv", ["--adv", "0.001"]),
    ("aug", ["--aug"]),
    ("dacs", ["--dacs", "1"]),
    ("dacs_rcs", ["--dacs", "1", "--rcs", "0.01"]),
]
EVERY_SEED = ("mmd", "dacs", "dacs_rcs")  # the methods every model runs on every seed
MMD_LAM = "0.05"  # the report's 0.01 moved nothing in the first (96x48, --bn mixed) benchmark; not rerun since
MODELS = {"deeplab": "DeepLabV3", "unet": "U-Net", "deeplabv3plus": "DeepLabV3+"}


def run(cmds, jobs):
    """Run the commands (each names its output with --out or --json), `jobs` at a time, each with its share
    of the CPU threads: small models on a few cores use threads badly, so two 1-thread runs on 2 cores do
    more than one 2-thread run. With more than one job, a run's output goes to OUTPUT.log (its tail is shown
    if it fails). Ctrl-C (or SIGTERM) stops the runs in progress, each saving its checkpoint, before this
    process ends."""
    cores = available_cpus()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // jobs))} if jobs > 1 else None
    pending, running, failure = list(cmds), [], None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while running or (pending and failure is None):
            while pending and len(running) < jobs and failure is None:
                cmd = pending.pop(0)
                print("$ python " + " ".join(cmd), flush=True)
                log = Path(output_of(cmd) + ".log") if jobs > 1 else None
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


def output_of(cmd):
    return next(cmd[i + 1] for i, arg in enumerate(cmd) if arg in ("--out", "--json"))


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: v if k in TEXT_COLUMNS else float(v) if v else float("nan") for k, v in r.items()}
                for r in csv.DictReader(f)]


def finished(cmd):
    """Whether this very command ran to its end: a training run's args.json holds its argv and metrics.csv
    its last epoch; an evaluation's JSON is newer than the checkpoint it scored."""
    out = Path(output_of(cmd))
    try:
        if cmd[0] == "evaluate.py":
            return out.stat().st_mtime > Path(cmd[cmd.index("--checkpoint") + 1]).stat().st_mtime
        argv = json.loads((out / "args.json").read_text())["argv"]
        return argv == cmd and int(rows(out)[-1]["epoch"]) >= int(cmd[cmd.index("--epochs") + 1])
    except (OSError, KeyError, IndexError, ValueError, TypeError):
        return False


def flags_of(name, bn=DEFAULT_BN):
    """train_mmd.py flags of a row: 'control' or a method's name."""
    flags = ["--lam", MMD_LAM if name == "mmd" else "0", "--bn", bn]
    return flags + next((f for n, f in METHODS if n == name), [])


def label(name):
    """A row's name: the methods its flags switch on, as train_mmd.py declares them ('--aug' is a training flag)."""
    import train_mmd
    parser = train_mmd.get_args_parser()
    args = parser.parse_args(flags_of(name))
    words = parser.methods.describe(args)
    return words if not args.aug else f"{words} with augmentation (--aug)" if words else "augmentation (--aug)"


def pm(values):
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


class Bench:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        data = self.out / "data"
        self.data = ["--gta5-root", str(data / "gta5"), "--cityscapes-root", str(data / "cityscapes")]
        self.common = [*self.data, "--size", args.size, "--amp", args.amp, "--cache"]
        self.queue, self.seconds = [], 0.0

    def make_pair(self):
        """OUT/data: the built-in pair at --num-source + --num-target images, made once; a pair of other numbers
        there is refused (every run would mix them)."""
        data, want = self.out / "data", {"num_source": self.args.num_source, "num_target": self.args.num_target}
        if not (data / "pair.json").exists():
            import toy
            shutil.rmtree(data, ignore_errors=True)  # a pair whose making was interrupted
            toy.make_toy(data, **want)
            atomic_write(data / "pair.json", lambda f: f.write(json.dumps(want)), mode="w")
        found = json.loads((data / "pair.json").read_text())
        if found != want:
            raise UserError(f"{data}: holds a pair of {found['num_source']} + {found['num_target']} images, not "
                            f"{want['num_source']} + {want['num_target']}; use another --out")

    def queue_cmd(self, cmd):
        if not finished(cmd) and cmd not in self.queue:
            self.queue.append(cmd)

    def flush(self):
        """Run what was queued since the last flush: commands that need none of each other's results."""
        started, queue, self.queue = time.time(), self.queue, []
        if queue:
            run(queue, self.args.jobs)
            self.seconds += time.time() - started

    def dir(self, model, name, seed):
        return self.out / model / f"{name}_seed{seed}"

    def seeds(self, model):
        return self.args.seeds if model != "deeplabv3plus" else self.args.seeds[:1]

    def phase1(self, model, seed):
        later = [p for p in (self.out / model).glob(f"*_seed{seed}")
                 if not p.name.startswith(("source_only", "oracle"))]
        cmd = ["train_seg.py", "--model", model, *self.common, "--channels-last", "--backbone", self.args.backbone,
               "--weights", "none", "--seed", str(seed), "--resume"]
        for name, extra in (("source_only", []), ("oracle", ["--train-on", "cityscapes"])):
            run = [*cmd, *extra, "--out", str(self.dir(model, name, seed)), "--epochs", str(self.args.epochs1)]
            if name == "source_only" and later and not finished(run):
                raise UserError(f"{self.dir(model, name, seed)}: would train on (other settings than its own) while "
                                f"{len(later)} run(s) started from it, such as {later[0]}; use another --out")
            self.queue_cmd(run)

    def adabn(self, model, seed, checkpoint, row):
        """AdaBN on the checkpoint: the row's target val mIoU, in OUT/MODEL/ROW_seedS.json."""
        self.queue_cmd(["evaluate.py", "--checkpoint", str(checkpoint), *self.common, "--adabn", "--json",
                        str(self.dir(model, row, seed)) + ".json"])

    def phase2(self, model, seed, name, bn=DEFAULT_BN):
        init = str(self.dir(model, "source_only", seed) / "best.pt")
        row = name if bn == DEFAULT_BN else f"{name}_bn{bn}"
        self.queue_cmd(["train_mmd.py", "--model", model, *self.common, "--channels-last", "--init", init,
                        *flags_of(name, bn), "--seed", str(seed), "--resume", "--out", str(self.dir(model, row, seed)),
                        "--epochs", str(self.args.epochs2)])

    def scores(self, model, row):
        """([source val], [target val]) over the seeds whose run of row exists: phase 2's last epoch, or an
        evaluation's JSON (target only)."""
        source, target = [], []
        for seed in self.seeds(model):
            run = self.dir(model, row, seed)
            if run.with_suffix(".json").exists():
                target.append(json.loads(run.with_suffix(".json").read_text())["miou"])
            elif (run / "metrics.csv").exists():
                last = rows(run)[-1]
                source.append(last["source_val_miou"])
                target.append(last["target_val_miou"])
        return source, target

    def table(self, model, labels):
        """Markdown rows: the baselines, then each (label, row) of labels."""
        seeds = self.seeds(model)
        before = [rows(self.dir(model, "control", s))[0] for s in seeds]  # phase 2's epoch 0: the source-only model
        results = {"source only (phase 1)": ([r["source_val_miou"] for r in before],
                                             [r["target_val_miou"] for r in before]),
                   "source only + AdaBN": self.scores(model, "adabn"),
                   "target oracle (trained on target labels)": ([], [rows(self.dir(model, "oracle", s))[-1]["val_miou"]
                                                                    for s in seeds])}
        results.update({label: self.scores(model, row) for label, row in labels})
        mean = {label: statistics.mean(target) for label, (_, target) in results.items()}
        floor = max(mean["source only (phase 1)"], mean["source only + AdaBN"])
        top, control = mean["target oracle (trained on target labels)"], mean[labels[0][0]]
        lines = ["| run | seeds | source val mIoU | target val mIoU | vs control | gap closed |",
                 "|---|---|---|---|---|---|"]
        for i, (label, (source, target)) in enumerate(results.items()):
            versus = f"{mean[label] - control:+.4f}" if i >= 3 else ""
            lines.append(f"| {label} | {len(target)} | {pm(source) if source else ''} | {pm(target)} | {versus} | "
                         f"{(mean[label] - floor) / (top - floor):.0%} |")
        return lines

    def main(self):
        args, started = self.args, time.time()
        self.make_pair()
        # rounds of commands that need none of each other's results: phase 1; AdaBN and the phase-2 rows of
        # every seed; the best method's other seeds, and AdaBN on the --bn mixed controls' weights
        for model in MODELS:
            for seed in self.seeds(model):
                self.phase1(model, seed)
        self.flush()
        for seed in args.seeds:  # seed by seed: an interrupted benchmark has whole first seeds
            for model in MODELS:
                if seed in self.seeds(model):
                    self.adabn(model, seed, self.dir(model, "source_only", seed) / "best.pt", "adabn")
                    for bn in BN_MODES:
                        self.phase2(model, seed, "control", bn)
                    for name in EVERY_SEED:
                        self.phase2(model, seed, name)
            if seed == args.seeds[0]:
                for name, _ in METHODS:
                    if name not in EVERY_SEED:
                        self.phase2("deeplab", seed, name)
        self.flush()
        first = {name: self.scores("deeplab", name)[1][0] for name, _ in METHODS}
        best = max(first, key=first.get)
        for seed in args.seeds[1:] if best not in EVERY_SEED else []:
            self.phase2("deeplab", seed, best)
        for model in MODELS:
            for seed in self.seeds(model):
                self.adabn(model, seed, self.dir(model, "control_bnmixed", seed) / "last.pt", "control_bnmixed_adabn")
        self.flush()
        labels = {name: label(name) for name, _ in METHODS}
        chosen = {**labels, best: labels[best] + " (the best on the first seed, chosen with target labels)"}
        controls = [(f"control (lam 0), --bn {DEFAULT_BN} (default)", "control"),
                    ("control (lam 0), --bn frozen", "control_bnfrozen"),
                    ("control (lam 0), --bn mixed (before --bn)", "control_bnmixed"),
                    ("the --bn mixed control's weights with AdaBN", "control_bnmixed_adabn")]
        seeds = ", ".join(map(str, args.seeds))
        spread = f"mean ± std over seeds {seeds} (the seeds column: how many)" if len(args.seeds) > 1 else \
            f"seed {seeds}"
        report = [f"{args.backbone}, {args.size}, --amp {args.amp}, channels_last, {args.num_source} + "
                  f"{args.num_target} images; phase 1 {args.epochs1} epochs (the oracle too), phase 2 {args.epochs2} "
                  f"epochs; last-epoch figures, {spread}. Methods under --bn {DEFAULT_BN}. Gap closed = (target − b) "
                  "/ (oracle − b), b the better of source only and AdaBN; vs control = target − the default "
                  "control's mean target.", ""]
        for model, title in MODELS.items():
            rows = [(chosen[n], n) for n, _ in METHODS] if model == "deeplab" else [(labels[n], n) for n in EVERY_SEED]
            report += [f"### {title}", "", *self.table(model, controls + rows), ""]
        report.append(f"Commands took {self.seconds / 60:.0f} min in this invocation, {args.jobs} at a time "
                      f"({(time.time() - started) / 60:.0f} min in all).")
        text = "\n".join(report) + "\n"
        atomic_write(self.out / "results.md", lambda f: f.write(text), mode="w")
        print("\n" + text + f"\nwrote {self.out / 'results.md'}")


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/adapt")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", default="256x128", help="(default: %(default)s)")
    p.add_argument("--num-source", type=int, default=200, help="source images of the pair (default: %(default)s)")
    p.add_argument("--num-target", type=int, default=400,
                   help="target images of the pair (default: %(default)s: 240 train, 40 val, and an oracle 0.2 above "
                        "AdaBN)")
    p.add_argument("--epochs1", type=int, default=15, help="phase-1 epochs (default: %(default)s)")
    p.add_argument("--epochs2", type=int, default=10, help="phase-2 epochs (default: the report's %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="precision of every run; auto is decided here once and passed on by name (default: auto)")
    p.add_argument("--jobs", type=int, default=None,
                   help="commands at a time, sharing the CPU threads (default: 2 on the CPU, 1 on a GPU)")
    return p


def main(args):
    if args.jobs is None:
        args.jobs = 1 if torch.cuda.is_available() or torch.backends.mps.is_available() else 2
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give 1 or more training runs at a time")
    args.amp, why = resolve_amp(args.amp, pick_device("auto"))
    print(f"precision: {args.amp} ({why})")
    Bench(args).main()


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
