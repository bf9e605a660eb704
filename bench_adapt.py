"""Which adaptation method works on the built-in pair, and by how much? One command:

    python bench_adapt.py --amp bf16          # the main table (pair 2); plain `python bench_adapt.py` picks the
                                              # precision for the machine (an --out begun under another --amp
                                              # is refused: continue it with the --amp it began with)
    python bench_adapt.py --seeds 1           # a first look: one main seed
    python bench_adapt.py --pair 1 --seeds 1 2 3 --amp bf16   # the first pair, whose domains differ in look only
    python bench_adapt.py --out runs/adapt_pair2              # run it again to continue where it stopped

It makes its own built-in pair (OUT/data) and trains with the real scripts. Every choice is made on target
val; every figure it reports for the target is target test (the seeded split's 30%, which no choice reads),
val beside it, labelled:

1. phase 1 for each model and seed: a source-only model (--epochs1) and a target oracle trained twice as long as
   source only and phase 2 together (--oracle-epochs, default 2 (--epochs1 + --epochs2)), because at their length
   its target val still rose (docs/benchmark.md);
2. the source-only model on its own and with AdaBN (evaluate.py --adabn), the oracle, and from the source-only
   model phase 2's lam-0 control (the same steps and batches with no target term) under --bn domain, and under
   frozen and mixed on the sweep seed;
3. the sweep, DeepLabV3 on --sweep-seed: each method at the three weights of its GRIDS entry, its weight picked
   by target val;
4. MMD (the report's method) and the two other methods the sweep ranks first, at their picked weights, on every
   main seed (--seeds, which exclude the sweep seed: a pick's luck stays out of the paired figures); the others
   keep their sweep run. U-Net and DeepLabV3+: the baselines, the controls and those three methods on the first
   main seed, at DeepLabV3's weights.

Each row's target test mIoU is paired with the control's of the same seed (same phase-1 model): the mean
difference, its 95% t interval over seeds, and how many seeds it won. OUT/results.md gets the tables,
OUT/results.json the numbers and the picks.
"""
import argparse
import csv
import hashlib
import itertools
import json
import math
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
from devices import AMP_MODES, available_cpus, pick_device, resolve_amp
from utils import ArgumentParser, UserError, run_main

REPO = Path(__file__).resolve().parent
MODELS = {"deeplab": "DeepLabV3", "unet": "U-Net", "deeplabv3plus": "DeepLabV3+"}
# each method's flags with {w} for its main weight, and the three weights its sweep tries: a factor-10 log grid
# around the value its paper used (FDA: its paper's three); None: nothing to tune
GRIDS = {
    "mmd": (["--lam", "{w}", "--multilevel"], ["0.001", "0.01", "0.1"]),  # the report: 0.01
    "ent": (["--ent", "{w}"], ["0.0001", "0.001", "0.01"]),  # ADVENT: 0.001
    "adv": (["--adv", "{w}"], ["0.0001", "0.001", "0.01"]),  # AdaptSegNet: 0.001
    "fda": (["--fda", "{w}"], ["0.01", "0.05", "0.09"]),  # FDA: 0.01, 0.05, 0.09
    "dacs": (["--dacs", "{w}"], ["0.1", "1", "10"]),  # DACS: 1
    "aug": (["--aug"], None),
}
# the t distribution's 0.975 quantile for 1..9 degrees of freedom: a 95% interval over 2..10 seeds
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


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
            checkpoint = Path(cmd[cmd.index("--checkpoint") + 1])
            # a score whose checkpoint is gone stands: results are kept without checkpoints (results/, README)
            return out.exists() and (not checkpoint.exists() or out.stat().st_mtime > checkpoint.stat().st_mtime)
        argv = json.loads((out / "args.json").read_text())["argv"]
        return argv == cmd and int(rows(out)[-1]["epoch"]) == int(cmd[cmd.index("--epochs") + 1])
    except (OSError, KeyError, IndexError, ValueError, TypeError):
        return False


def flags_of(method, weight=None, bn=DEFAULT_BN):
    """train_mmd.py's flags of a row: the control (method None) or a method at a weight, under --bn."""
    flags = [f.format(w=weight) for f in GRIDS[method][0]] if method else []
    return (["--lam", "0"] if "--lam" not in flags else []) + flags + ["--bn", bn]


def label(method, weight=None):
    """A row's name: the methods its flags switch on, as train_mmd.py declares them ('--aug' is a training flag)."""
    import train_mmd
    parser = train_mmd.get_args_parser()
    args = parser.parse_args(flags_of(method, weight))
    words = parser.methods.describe(args)
    return words if not args.aug else f"{words} with augmentation (--aug)" if words else "augmentation (--aug)"


def pm(values):
    """mean ± std over seeds (the mean alone for one)."""
    values = list(values)
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}" if values else ""


def paired(values, control):
    """A row against the control, seed by seed (the seeds both have): (mean difference, half-width of its 95% t
    interval or None for one seed, seeds won, seeds)."""
    d = [values[s] - control[s] for s in sorted(set(values) & set(control))]
    if not d:
        return None
    half = T_975[len(d) - 2] * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return statistics.mean(d), half, sum(x > 0 for x in d), len(d)


def paired_text(p):
    if p is None:
        return ""
    mean, half, wins, n = p
    interval = f" [{mean - half:+.4f}, {mean + half:+.4f}]" if half is not None else ""
    return f"{mean:+.4f}{interval}, won {wins}/{n}"


class Bench:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        data = self.out / "data"
        self.data = ["--gta5-root", str(data / "gta5"), "--cityscapes-root", str(data / "cityscapes")]
        self.common = [*self.data, "--size", args.size, "--amp", args.amp, "--cache"]
        self.queue, self.seconds = [], 0.0
        self.trained = {}  # (model, row, seed) of every phase-2 run asked for, in order: each gets a test score

    def make_pair(self):
        """OUT/data: built-in pair --pair at --num-source + --num-target images. OUT/pair.json records which pair and a
        digest of its files: another pair is refused (every run would mix them), and so is the same pair drawn with
        other bytes, where kept numbers are continued on another machine (another numpy or Pillow)."""
        import toy
        import toy2
        data, record, before = self.out / "data", self.out / "pair.json", self.out / "data" / "pair.json"
        sizes = {"num_source": self.args.num_source, "num_target": self.args.num_target}
        want = {**sizes, "pair": self.args.pair, **({"look": toy2.LOOK} if self.args.pair == 2 else {})}
        found = (json.loads(record.read_text()) if record.exists() else  # before pair 2: data/pair.json, pair 1
                 {"pair": 1, **json.loads(before.read_text())} if before.exists() else None)
        if found is not None and {k: v for k, v in found.items() if k != "digest"} != want:
            raise UserError(f"{data}: holds {describe_pair(found)}, not {describe_pair(want)}; use another --out")
        if not ((data / "gta5").is_dir() and (data / "cityscapes").is_dir()):
            shutil.rmtree(data, ignore_errors=True)  # a pair whose making was interrupted, or none yet
            (toy2 if self.args.pair == 2 else toy).make_toy(data, **sizes)
        digest = tree_digest(data / "gta5") + tree_digest(data / "cityscapes")
        if found is None or "digest" not in found:
            atomic_write(record, lambda f: f.write(json.dumps({**want, "digest": digest})), mode="w")
        elif found["digest"] != digest:
            raise UserError(f"{data}: other bytes than the pair the runs in {self.out} were trained on (another numpy "
                            "or Pillow draws it otherwise); continue them with the versions they began with, or use "
                            "another --out")

    def queue_cmd(self, cmd):
        if cmd[0] != "evaluate.py" and (Path(output_of(cmd)) / "metrics.csv").exists():
            done, asked = int(rows(output_of(cmd))[-1]["epoch"]), int(cmd[cmd.index("--epochs") + 1])
            if done > asked:  # a resume would train nothing and the table would name the wrong length
                raise UserError(f"{output_of(cmd)}: trained {done} epochs already, more than the {asked} asked for; "
                                "use another --out")
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
        """The seeds of a model's main rows: all of --seeds for DeepLabV3, the first for the others."""
        return self.args.seeds if model == "deeplab" else self.args.seeds[:1]

    def spare(self, model):
        """The seed of a model's one-seed rows: DeepLabV3's sweep seed (the --bn variants too), else its seed."""
        return self.args.sweep_seed if model == "deeplab" else self.args.seeds[0]

    def every_seed(self, model):
        """The seeds a model has a phase-1 model and a control for: the main ones and the spare."""
        return sorted(set(self.seeds(model)) | {self.spare(model)})

    # ------------------------------------------------------------------ the commands

    def phase1(self, model, seed):
        later = [p for p in (self.out / model).glob(f"*_seed{seed}")
                 if p.is_dir() and not p.name.startswith(("source_only", "oracle"))]
        common = ["train_seg.py", "--model", model, *self.common, "--channels-last", "--backbone",
                  self.args.backbone, "--weights", "none", "--seed", str(seed), "--resume"]
        for name, extra, epochs in (("source_only", [], self.args.epochs1),
                                    ("oracle", ["--train-on", "cityscapes"], self.args.oracle_epochs)):
            cmd = [*common, *extra, "--out", str(self.dir(model, name, seed)), "--epochs", str(epochs)]
            if name == "source_only" and later and not finished(cmd):
                raise UserError(f"{self.dir(model, name, seed)}: would train on (other settings than its own) while "
                                f"{len(later)} run(s) started from it, such as {later[0]}; use another --out")
            self.queue_cmd(cmd)

    def evaluate(self, model, row, seed, checkpoint, split, adabn=False):
        """evaluate.py of a checkpoint on a target split: OUT/MODEL/ROW_seedS.SPLIT.json."""
        self.queue_cmd(["evaluate.py", "--checkpoint", str(checkpoint), *self.common, "--split", split,
                        *(["--adabn"] if adabn else []), "--json", f"{self.dir(model, row, seed)}.{split}.json"])

    def phase2(self, model, seed, row, flags):
        self.trained[model, row, seed] = True
        init = self.dir(model, "source_only", seed) / "best.pt"
        cmd = ["train_mmd.py", "--model", model, *self.common, "--channels-last", "--init", str(init), *flags,
               "--seed", str(seed), "--resume", "--out", str(self.dir(model, row, seed)), "--epochs", str(self.args.epochs2)]
        if not finished(cmd) and not init.exists() and (init.parent / "metrics.csv").exists():
            raise UserError(f"{init}: gone (its run's numbers were kept without checkpoints), and "
                            f"{self.dir(model, row, seed)} starts from it; to run seed {seed} of {model} again, move all "
                            f"of {self.out / model}/*_seed{seed}* away (its rows pair with that phase-1 model)")
        self.queue_cmd(cmd)

    def evaluate_trained(self):
        """Queue the target test score of every phase-2 run asked for so far (a finished one is not run again)."""
        for model, row, seed in self.trained:
            self.evaluate(model, row, seed, self.dir(model, row, seed) / "last.pt", "test")

    # ------------------------------------------------------------------ the figures

    def score(self, model, row, seed, split):
        """A row's target mIoU on a split for a seed (None if not there): an evaluation's JSON, else (target val of
        a phase-2 run, or val of the oracle) the last epoch of its metrics.csv."""
        path = self.dir(model, row, seed)
        if Path(f"{path}.{split}.json").exists():
            return json.loads(Path(f"{path}.{split}.json").read_text())["miou"]
        if split == "val" and (path / "metrics.csv").exists():
            last = rows(path)[-1]
            return last.get("target_val_miou", last.get("val_miou"))
        return None

    def scores(self, model, row, split, seeds):
        """{seed: score} over those of seeds that have one."""
        found = {s: self.score(model, row, s, split) for s in seeds}
        return {s: v for s, v in found.items() if v is not None}

    def source_val(self, model, row, seeds):
        """{seed: source val mIoU}: a phase-2 row's last epoch; for source only, phase 2's epoch 0 (its model)."""
        found = {}
        for seed in seeds:
            path = self.dir(model, "control" if row == "source_only" else row, seed)
            if row not in ("adabn", "oracle") and (path / "metrics.csv").exists():
                found[seed] = rows(path)[0 if row == "source_only" else -1]["source_val_miou"]
        return found

    def sweep(self):
        """{method: (picked weight, {weight: target val on the sweep seed})}: each weight picked by target val."""
        picks = {}
        for method, (_, weights) in GRIDS.items():
            vals = {w: self.score("deeplab", row_name(method, w), self.args.sweep_seed, "val") for w in weights or [None]}
            picks[method] = (max(vals, key=lambda w: vals[w]), vals)
        return picks

    def table(self, model, table_rows):
        """Markdown lines for (label, row, weight, seeds) of a model, and their numbers. Gap closed is taken seed by
        seed, (row - b) / (oracle - b), b the source-only model alone or with AdaBN: whichever scores higher on
        target val (over the model's main seeds), then averaged over the row's seeds."""
        every = self.every_seed(model)
        control = self.scores(model, "control", "test", every)
        val = {b: statistics.mean(self.scores(model, b, "val", self.seeds(model)).values())
               for b in ("source_only", "adabn")}
        floor = max(val, key=val.get)
        b, top = self.scores(model, floor, "test", every), self.scores(model, "oracle", "test", every)
        lines = ["| run | weight | seeds | source val mIoU | target val mIoU | **target test mIoU** | test vs control, "
                 "paired: mean [95% interval], seeds won | gap closed (test) |", "|---|---|---|---|---|---|---|---|"]
        numbers = {}
        for text, row, weight, seeds in table_rows:
            test, v, sv = (self.scores(model, row, "test", seeds), self.scores(model, row, "val", seeds),
                           self.source_val(model, row, seeds))
            versus = paired(test, control) if row != "control" else None
            gaps = [(test[s] - b[s]) / (top[s] - b[s]) for s in test if s in b and s in top and top[s] != b[s]]
            gap = f"{statistics.mean(gaps):.0%}" if gaps else ""
            lines.append(f"| {text} | {weight or ''} | {', '.join(map(str, test))} | {pm(sv.values())} | "
                         f"{pm(v.values())} | {pm(test.values())} | {paired_text(versus)} | {gap} |")
            numbers[row] = {"label": text, "weight": weight, "test": test, "val": v, "source_val": sv,
                            "vs_control": versus}
        return lines, numbers, floor

    @staticmethod
    def between(numbers, names):
        """Each two of the rows named, paired seed by seed on target test, the one with the higher mean first: the
        control is not the only row a method is said to beat."""
        out = {}
        for pair in itertools.combinations(names, 2):
            hi, lo = sorted(pair, key=lambda r: statistics.mean(numbers[r]["test"].values()), reverse=True)
            out[f"{numbers[hi]['label']} − {numbers[lo]['label']}"] = paired(numbers[hi]["test"], numbers[lo]["test"])
        return out

    def oracle_curve(self, model):
        """The oracle's target val over the 5 epochs up to the adapted models' length, up to 5 epochs before its end
        and up to its end, mean over those epochs and the model's main seeds (one epoch's val moves by up to 0.06):
        whether it still rose."""
        marks = sorted({min(self.args.epochs1 + self.args.epochs2, self.args.oracle_epochs),
                        max(5, self.args.oracle_epochs - 5), self.args.oracle_epochs})
        curves = [rows(self.dir(model, "oracle", s)) for s in self.seeds(model)]
        means = {e: statistics.mean(r["val_miou"] for c in curves for r in c[max(0, e - 5):e]) for e in marks}
        return means, means[marks[-1]] > means[marks[-2]] if len(marks) > 1 else False

    def main(self):
        args, started = self.args, time.time()
        self.make_pair()
        # rounds of commands that need none of each other's results
        for model in args.models:
            for seed in self.every_seed(model):
                self.phase1(model, seed)
        self.flush()
        for model in args.models:  # the baselines, the controls, the sweep
            for seed in self.every_seed(model):
                best, oracle = self.dir(model, "source_only", seed) / "best.pt", self.dir(model, "oracle", seed)
                for split in ("val", "test"):
                    self.evaluate(model, "source_only", seed, best, split)
                    self.evaluate(model, "adabn", seed, best, split, adabn=True)
                self.evaluate(model, "oracle", seed, oracle / "last.pt", "test")
                for bn in BN_MODES if seed == self.spare(model) else [DEFAULT_BN]:
                    self.phase2(model, seed, "control" + ("" if bn == DEFAULT_BN else f"_bn{bn}"), flags_of(None, bn=bn))
        for method, (_, weights) in GRIDS.items():
            for weight in weights or [None]:
                self.phase2("deeplab", args.sweep_seed, row_name(method, weight), flags_of(method, weight))
        self.flush()
        picks = self.sweep()
        best_val = {m: vals[pick] for m, (pick, vals) in picks.items()}
        every_seed = ["mmd", *sorted((m for m in GRIDS if m != "mmd"), key=best_val.get, reverse=True)[:2]]
        self.evaluate_trained()
        for model in args.models:  # MMD and the sweep's first two on every main seed, at the weights picked
            for seed in self.seeds(model):
                for method in every_seed:
                    self.phase2(model, seed, row_name(method, picks[method][0]), flags_of(method, picks[method][0]))
        self.flush()
        self.evaluate_trained()
        self.flush()
        self.report(picks, every_seed, time.time() - started)
        for model in sorted(set(MODELS) - set(args.models)):
            if (self.out / model).is_dir():
                print(f"{self.out / model}: not in --models, so not in this report; name it to report it")

    def report(self, picks, every_seed, seconds):
        args = self.args
        seeds = ", ".join(map(str, args.seeds))
        pair = describe_pair(json.loads((self.out / "pair.json").read_text()))
        text = [f"The built-in {pair}; {args.backbone}, {args.size}, --amp {args.amp}, channels_last; phase 1 "
                f"{args.epochs1} epochs, the oracle {args.oracle_epochs}, phase 2 {args.epochs2}. Every "
                f"choice is made on target val; target test is what no choice read. Main rows: seeds {seeds}; the "
                f"sweep and the rows it alone ran: seed {args.sweep_seed} (the seeds column says which). Phase-2 "
                "rows and the oracle: last epoch; source only: phase 1's best source-val epoch, the model phase 2 "
                "starts from.", "", f"### The sweep (DeepLabV3, seed {args.sweep_seed}): target val mIoU at each "
                "weight, the pick in bold", "", "| method | weight 1 | weight 2 | weight 3 |", "|---|---|---|---|"]
        for method, (pick, vals) in picks.items():
            cells = [f"{v:.4f}" if w is None else f"**{w}: {v:.4f}**" if w == pick else f"{w}: {v:.4f}"
                     for w, v in vals.items()]
            text.append(f"| {label(method, pick)} | " + " | ".join(cells + [""] * (3 - len(cells))) + " |")
        results = {"picks": {m: p for m, (p, _) in picks.items()}, "every_seed": every_seed, "models": {}}
        for model, title in ((m, MODELS[m]) for m in args.models):
            main, spare = self.seeds(model), [self.spare(model)]
            table_rows = [("source only (phase 1)", "source_only", None, main), ("source only + AdaBN", "adabn", None, main),
                          (f"target oracle ({args.oracle_epochs} epochs on target labels)", "oracle", None, main),
                          ("control (lam 0), --bn domain (default)", "control", None, main),
                          ("control, --bn frozen", "control_bnfrozen", None, spare),
                          ("control, --bn mixed", "control_bnmixed", None, spare)]
            for m in (GRIDS if model == "deeplab" else every_seed):
                weight = picks[m][0]
                table_rows.append((label(m, weight), row_name(m, weight), weight, main if m in every_seed else spare))
            lines, numbers, floor = self.table(model, table_rows)
            curve, rising = self.oracle_curve(model)
            between = self.between(numbers, [row_name(m, picks[m][0]) for m in every_seed]) if len(main) > 1 else {}
            results["models"][model] = {"rows": numbers, "floor": floor, "oracle_val": curve, "between": between}
            text += ["", f"### {title}", "", *lines, "", f"Gap closed from {numbers[floor]['label']} (the better of the "
                     "two on target val). The oracle's target val, mean over the 5 epochs up to an epoch and over the "
                     "main seeds: " + ", ".join(f"up to epoch {e} {v:.4f}" for e, v in curve.items())
                     + (" — still rising at its end" if rising else " — no longer rising")]
            if between:
                text += ["", "The rows run on every main seed against each other, paired the same way:", "",
                         "| higher − lower (by mean) | target test, paired: mean [95% interval], seeds won |", "|---|---|"]
                text += [f"| {pair} | {paired_text(p)} |" for pair, p in between.items()]
        text.append(f"\nThis invocation took {seconds / 60:.0f} min, {self.seconds / 60:.0f} of them running commands, "
                    f"{args.jobs} at a time; the runs it found finished, from earlier invocations, are not counted.")
        report = "\n".join(text) + "\n"
        atomic_write(self.out / "results.md", lambda f: f.write(report), mode="w")
        atomic_write(self.out / "results.json", lambda f: f.write(json.dumps(results, indent=1)), mode="w")
        print("\n" + report + f"\nwrote {self.out / 'results.md'}")


def tree_digest(folder):
    """sha256 of the files under folder (hidden ones, such as a --cache, left out), names and bytes."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def describe_pair(p):
    look = f" (look {p['look']})" if "look" in p else ""
    return f"pair {p['pair']}{look}, {p['num_source']} + {p['num_target']} images"


def row_name(method, weight):
    """The run folder's name (without the seed) of a method at a weight."""
    return method if weight is None else f"{method}{weight}"


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", type=int, choices=(1, 2), default=2,
                   help="the built-in pair (datasets.py make-toy --pair): 2 differs in layout, cameras and shapes as well "
                        "as look; 1 in look (default: %(default)s)")
    p.add_argument("--out", default=None, help="(default: runs/adapt_pairN)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", default="256x128", help="(default: %(default)s)")
    p.add_argument("--num-source", type=int, default=200, help="source images of the pair (default: %(default)s)")
    p.add_argument("--num-target", type=int, default=400,
                   help="target images of the pair (default: %(default)s: 240 train, 40 val, 120 test)")
    p.add_argument("--epochs1", type=int, default=15, help="phase-1 epochs (default: %(default)s)")
    p.add_argument("--epochs2", type=int, default=10, help="phase-2 epochs (default: the report's %(default)s)")
    p.add_argument("--oracle-epochs", type=int, default=None,
                   help="the oracle's epochs (default: 2 (--epochs1 + --epochs2), twice as long as source only and "
                        "phase 2: at their length its target val still rose)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="the models to run; DeepLabV3 runs the sweep, so it must be one (default: all three)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                   help="the main rows' seeds (default: 1 2 3 4 5; U-Net and DeepLabV3+ run the first)")
    p.add_argument("--sweep-seed", type=int, default=0,
                   help="the seed of the sweep, which picks each method's weight on target val, and of the rows only it "
                        "runs; not one of --seeds, so that the pick's luck does not reach the paired figures "
                        "(default: %(default)s)")
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
    if len(args.seeds) > len(T_975) + 1:
        raise UserError(f"--seeds: at most {len(T_975) + 1} (the t quantiles this knows)")
    if "deeplab" not in args.models:
        raise UserError("--models: DeepLabV3 (deeplab) must be one; its sweep picks every method's weight")
    args.models = [m for m in MODELS if m in args.models]
    if args.sweep_seed in args.seeds:
        raise UserError(f"--sweep-seed {args.sweep_seed}: also in --seeds; the picks would bias that seed's figures")
    args.oracle_epochs = args.oracle_epochs or 2 * (args.epochs1 + args.epochs2)
    if args.out is None and Path("runs/adapt").is_dir():
        print(f"runs/adapt: a benchmark from before there were two pairs (pair 1); this one goes to "
              f"runs/adapt_pair{args.pair} (continue that one with --out runs/adapt --pair 1)")
    args.out = args.out or f"runs/adapt_pair{args.pair}"
    args.amp, why = resolve_amp(args.amp, pick_device("auto"))
    print(f"precision: {args.amp} ({why})")
    Bench(args).main()


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
