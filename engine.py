"""The training engine both phases run on: resume, train one epoch, end the epoch, save.

A phase script builds its model, data and losses, and hands the engine a Phase:

    phase = engine.Phase("mmd", step, validate, best={"best_target.pt": "target_val_miou"},
                         resume_keys=("lam", "multilevel", "sigma"))
    engine.fit(ctx, args, model, optimizer, [source_loader, target_loader], phase, config)

`step(net, batches, train_cm) -> (loss, {column: tensor})` computes one step's loss (under autocast) from
one batch of each loader and adds its source predictions to train_cm; the engine does everything else:
backward and the optimiser step, the epoch's sums, validation, best files, metrics.csv, last.pt, resume,
signals, non-finite losses. A method with state of its own (a discriminator and its optimiser, an EMA
teacher) lists it in `Phase.extra`: each entry is saved in last.pt and restored on resume, each optimiser
among them is stepped together with the model's, and `Phase.after_step()` runs after every optimiser step.

Files in OUT: args.json, metrics.csv (one row per epoch), last.pt (everything needed to continue) and one
file per `Phase.best` entry, rewritten whenever its column reaches a new maximum: weights, configuration,
epoch and metrics only.
"""
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from files import RunLock, atomic_write, read_checkpoint, save_checkpoint
from devices import AMP_MODES
from utils import ConfusionMatrix, StopRequested, UserError, get_rng_state, set_rng_state

# what a resumed run must share with the run it continues, whatever the phase (--epochs too under poly)
RESUME_MUST_MATCH = ("size", "batch_size", "lr", "lambda_dice", "scheduler", "warmup", "train_limit", "hflip", "aug",
                     "seed", "split_scheme")
SCRIPTS = {"seg": "train_seg.py", "mmd": "train_mmd.py"}
ORDER = "global-batches"  # how ShardSampler shares an epoch between processes; a mid-epoch resume needs the same
PROGRESS_SECONDS = 30  # without a terminal, a progress line at least this often (and every --log-every steps)
# fp16: GradScaler skips a step whose gradients overflow and halves its scale; this many in a row leave the scale
# 2^25 (33 million) times smaller than when a step last went through: the loss or the gradients are not finite
MAX_SKIPPED = 25
SKIPPED = "skipped_steps"  # the metrics.csv column of the steps fp16's scaler skipped in an epoch
TEXT_COLUMNS = ("precision",)  # metrics.csv's columns that are not numbers
# an optimiser's implementation switches: this session's, whatever the checkpoint's (it may come from another device)
IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


@dataclass
class Phase:
    name: str  # recorded in every checkpoint: --resume refuses another phase's file
    step: Callable  # step(net, batches, train_cm) -> (loss, {column: tensor})
    validate: Callable  # validate(model) -> {column: float}, after each epoch
    best: dict  # file name -> the column whose maximum it keeps
    resume_keys: tuple = ()  # the phase's own arguments a resumed run must share
    extra: dict = field(default_factory=dict)  # name -> module or optimiser of the method: saved and restored
    after_step: Optional[Callable] = None  # after each optimiser step, given the steps taken (an EMA teacher)
    validate_first: bool = False  # validate once before training, as epoch 0 (recorded, never a best)
    before: dict = field(default_factory=dict)  # argument -> the value runs that predate it had (a resume key)


def fit(ctx, args, model, optimizer, loaders, phase, config):
    """Train until args.epochs (or args.session_epochs more); return the run's state. Rank 0 holds OUT/.lock
    meanwhile: a second run into the same --out is refused."""
    with RunLock(args.out, active=ctx.main):
        return Trainer(ctx, args, model, optimizer, loaders, phase, config).fit()


class Trainer:
    """One training run: the objects it trains, its progress, and the files it writes."""

    def __init__(self, ctx, args, model, optimizer, loaders, phase, config):
        self.ctx, self.args, self.model, self.optimizer = ctx, args, model, optimizer
        self.loaders, self.phase, self.config = loaders, phase, config
        self.out = Path(args.out)
        self.steps_per_epoch = len(loaders[0].sampler) // args.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(loaders[0].dataset)} training images are fewer than one batch of "
                            f"{args.batch_size} per process; lower --batch-size")
        total = self.steps_per_epoch * args.epochs
        poly = args.scheduler == "poly"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, total, poly, args.warmup))
        self.optimizers = [optimizer] + [o for o in phase.extra.values() if isinstance(o, torch.optim.Optimizer)]
        # progress; a checkpoint holds these at its top level
        self.state = {"epoch": 0, "step": 0, "best": {}, "history": [], "partial": None}
        self.sessions = []  # one entry per invocation: where it started, its device and precision
        self.skipped_in_a_row = 0  # fp16: steps the gradient scaler skipped in a row, across epochs and sessions
        self.net = model

    def fit(self):
        ctx, args = self.ctx, self.args
        if args.resume:
            self.resume()
        self.sessions.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": self.state["epoch"],
                              "step": self.state["step"], "device": ctx.device_name, "amp": ctx.amp})
        self.skips = torch.full((2,), self.skipped_in_a_row, device=ctx.device)  # in a row now, and at most
        if ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "args.json", lambda f: f.write(json.dumps(
                {"argv": sys.argv, "args": vars(args)}, indent=1, default=str)), mode="w")
        self.net = ctx.wrap(self.model)
        self.steps_run = 0  # in this invocation: --sync-debug spares the first 3 (compiling, DDP's bucket rebuild)
        if args.compile:
            self.net = compiled(self.net, ctx.device)
        if self.phase.validate_first and not self.state["history"]:
            row = {"epoch": 0, **self.phase.validate(self.model), "precision": ctx.amp}
            self.state["history"].append(row)
            ctx.print("epoch 0 (before training): " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                               if isinstance(v, float)))
        with StopRequested() as self.stop:
            for epochs_run, epoch in enumerate(range(self.state["epoch"], args.epochs)):
                if args.session_epochs is not None and epochs_run >= args.session_epochs:
                    ctx.print(f"session done after {epochs_run} epochs ({epoch}/{args.epochs}); continue with --resume")
                    break
                epoch_sums = self.train_one_epoch(epoch)
                self.end_of_epoch(epoch, epoch_sums)
        return self.state

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self):
        """Everything --resume needs: last.pt."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.ctx.scaler.state_dict(),
                "extra": {name: obj.state_dict() for name, obj in self.phase.extra.items()},
                "rng": get_rng_state(self.ctx.device), "phase": self.phase.name, "config": self.config,
                "args": plain_args(self.args), "world": self.ctx.world, "order": ORDER, "sessions": self.sessions,
                "skipped_in_a_row": int(self.skips[0]), **self.state}

    def weights(self, row):
        """A best file: weights and what --init, --weights, evaluate.py and visualize.py read, no optimiser state."""
        return {"model": self.model.state_dict(), "config": self.config, "phase": self.phase.name,
                "args": plain_args(self.args), "epoch": row["epoch"], "metrics": row}

    def resume(self):
        ctx, args = self.ctx, self.args
        path = self.out / "last.pt" if args.resume == "last" else Path(args.resume)
        if args.resume == "last" and not path.exists():
            ctx.print(f"no checkpoint at {path}: starting from scratch")
            return
        ckpt = resumable_checkpoint(path, args, self.phase, self.config)
        if ckpt["partial"] is not None and ckpt.get("world", 1) > 1 and ckpt.get("order") != ORDER:
            raise UserError(f"{path}: was saved mid-epoch by an earlier version, whose processes shared out the "
                            "images differently; finish that epoch with it, or start another --out")
        if ckpt["partial"] is not None and ckpt.get("world", 1) != ctx.world:
            raise UserError(f"{path}: was saved mid-epoch by {ckpt.get('world', 1)} process(es); resume it with "
                            f"as many (this run has {ctx.world}), or from an epoch-end checkpoint")
        missing = [name for name in self.phase.extra if name not in ckpt.get("extra", {})]
        if missing:
            raise UserError(f"{path}: holds no state for {', '.join(missing)}; resume with the settings that run "
                            "used, or start another --out")
        try:
            self.model.load_state_dict(ckpt["model"])
            load_optimizer(self.optimizer, ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ctx.scaler.is_enabled() and ckpt["scaler"]:  # a run may switch --amp between sessions
                ctx.scaler.load_state_dict(ckpt["scaler"])
            for name, obj in self.phase.extra.items():
                if isinstance(obj, torch.optim.Optimizer):
                    load_optimizer(obj, ckpt["extra"][name])
                else:
                    obj.load_state_dict(ckpt["extra"][name])
            for optimizer in self.optimizers:  # load_state_dict takes moments of any shape: the first step would fail
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape
                               for v in optimizer.state.get(p, {}).values()):
                            raise ValueError(f"optimiser state of shape other than its parameter's {list(p.shape)}")
            self.state = {k: ckpt[k] for k in self.state}
            self.sessions = ckpt.get("sessions", [])  # none in checkpoints from before sessions were kept
            self.skipped_in_a_row = int(ckpt.get("skipped_in_a_row", 0))
            state, partial = self.state, self.state["partial"]
            if not (all(type(state[k]) is int and state[k] >= 0 for k in ("epoch", "step"))
                    and isinstance(state["best"], dict) and isinstance(state["history"], list)
                    and all(isinstance(row, dict) for row in state["history"])
                    and isinstance(self.sessions, list) and all(isinstance(x, dict) for x in self.sessions)
                    and (partial is None or isinstance(partial, dict) and isinstance(partial.get("sums"), dict)
                         and torch.is_tensor(partial.get("train_cm")) and "seconds" in partial)):
                raise ValueError("its progress (epoch, step, best, history, partial) is not what this project writes")
            set_rng_state(ckpt["rng"], ctx.device)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: does not fit this run ({reason}): damaged, or of another run; use another "
                            "checkpoint or start another --out") from None
        ctx.print(f"resumed from {path}: epoch {self.state['epoch']}, step {self.state['step']}")
        before = self.sessions[-1].get("amp") if self.sessions else ckpt["args"].get("amp")  # older: as resolved
        if before in AMP_MODES and before not in ("auto", ctx.amp):
            ctx.print(f"precision: {ctx.amp} from here on, {before} until now ("
                      + ("--amp auto picks it for each session's device)" if args.amp == "auto" else
                         f"as --amp {args.amp} asks)"))

    def save_partial(self, sums):
        """last.pt in the middle of an epoch: the epoch's sums of all processes so far, and where it stands."""
        totals, cm = {k: v.clone() for k, v in sums.values.items()}, sums.train_cm.mat.clone()
        self.ctx.all_reduce(*totals.values(), cm)
        self.state["partial"] = {"sums": {k: v.item() for k, v in totals.items()}, "train_cm": cm.cpu(),
                                 "seconds": time.time() - sums.started}
        if self.ctx.main:
            save_checkpoint(self.out / "last.pt", self.checkpoint())

    def halt(self, epoch, sums, signum):
        self.save_partial(sums)
        self.ctx.print(f"stopped by signal {signum} at epoch {epoch + 1}, step {self.state['step']}; "
                       f"saved {self.out / 'last.pt'}: continue with --resume")
        # DDP's reducer must go before the process group: left to hold its last reference, it would destroy
        # it while holding the GIL, and gloo's worker thread, wanting the GIL, would wait forever
        self.net = None
        self.ctx.close()
        sys.exit(128 + signum)

    # ------------------------------------------------------------------ one epoch

    def train_one_epoch(self, epoch):
        ctx, args, state = self.ctx, self.args, self.state
        sums = EpochSums(ctx, state["partial"])
        for loader in self.loaders:  # the epoch's randomness depends on (seed, epoch, index) only
            loader.sampler.set_epoch(epoch, state["step"] * args.batch_size)
        self.net.train()
        self.bad_step, self.bad_terms = torch.full((), -1, device=ctx.device), {}
        bar = tqdm(zip(*self.loaders), total=self.steps_per_epoch, initial=state["step"],
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=not (ctx.main and sys.stderr.isatty()),
                   leave=False, dynamic_ncols=True)
        batches_of = iter(bar)
        self.clock = (time.time(), state["step"])  # for the progress lines: images/s and ETA of this session
        self.last_line = time.time()
        while True:
            try:
                batches = next(batches_of)
            except StopIteration:
                break
            except RuntimeError:  # DataLoader workers killed (a signal they do not ignore) after ours arrived
                if self.stop.signal is None or ctx.world > 1:  # several processes could not agree on a step now
                    raise
                self.halt(epoch, sums, self.check(epoch) or self.stop.signal)
            with ctx.no_sync_allowed(self.steps_run >= 3):
                with ctx.autocast():
                    loss, logs = self.phase.step(self.net, batches, sums.train_cm)
                self.watch(loss, logs)
                skipped = self.optimize(loss)
                if skipped is not None:
                    run = torch.where(skipped, self.skips[0] + 1, 0)
                    self.skips = torch.stack([run, torch.maximum(self.skips[1], run)])
                sums.add(logs, skipped)
            state["step"] += 1
            self.steps_run += 1
            every = args.save_every_steps
            save = every and state["step"] % every == 0 and state["step"] < self.steps_per_epoch
            log = state["step"] % args.log_every == 0
            # one process can act on its own signal at once; several must agree, at steps they all check
            if log or save or state["step"] == self.steps_per_epoch or (ctx.world == 1 and self.stop.signal):
                signum = self.check(epoch)
                if signum:
                    self.halt(epoch, sums, signum)
                if log and not bar.disable:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in self.running_means(sums).items()})
            # no terminal (Colab's !python, a batch job's log file): a plain line now and then instead of the bar
            if (bar.disable and ctx.main and state["step"] < self.steps_per_epoch
                    and (log or time.time() - self.last_line >= PROGRESS_SECONDS)):
                self.progress_line(epoch, sums)
            if save:
                self.save_partial(sums)
        bar.close()
        return sums

    def running_means(self, sums):
        """Each logged term's mean over this process's steps of the epoch in this session (a resumed epoch's
        earlier sums are all processes' together)."""
        steps = max(1, self.state["step"] - self.clock[1])
        return {k: (v - sums.inherited.get(k, 0.0)).item() / steps for k, v in sums.values.items() if k != SKIPPED}

    def progress_line(self, epoch, sums):
        """epoch, step/steps, the running mean of each logged term (this process), images/s, the epoch's ETA."""
        state, args = self.state, self.args
        seconds, steps = time.time() - self.clock[0], state["step"] - self.clock[1]
        per_step = seconds / max(1, steps)
        terms = ", ".join(f"{k} {v:.4f}" for k, v in self.running_means(sums).items())
        eta = int(per_step * (self.steps_per_epoch - state["step"]))
        print(f"epoch {epoch + 1}/{args.epochs} step {state['step']}/{self.steps_per_epoch}: {terms}, "
              f"{steps * args.batch_size * self.ctx.world / max(seconds, 1e-9):.1f} images/s, "
              f"ETA {eta // 60}m{eta % 60:02d}s", file=sys.stderr, flush=True)
        self.last_line = time.time()

    def watch(self, loss, logs):
        """Remember the first step whose loss is not finite, and its terms, without reading anything back.
        Each term keeps the step it was recorded at: a method may log a term only every k steps."""
        first = ~torch.isfinite(loss.detach()) & (self.bad_step < 0)
        step = self.state["step"] + 1
        for k, v in logs.items():
            v = v.detach().float()
            if k not in self.bad_terms:
                self.bad_terms[k] = (torch.full_like(v, float("nan")), torch.full_like(self.bad_step, -1))
            kept, at = self.bad_terms[k]
            self.bad_terms[k] = (torch.where(first, v, kept), torch.where(first, step, at))
        self.bad_step = torch.where(first, step, self.bad_step)

    def check(self, epoch):
        """The loop's read-back from the device, every --log-every steps and before any file is written (the
        only other: without a terminal, rank 0's progress line reads its running sums, at most every 30 s):
        a non-finite loss (fp16: MAX_SKIPPED steps in a row that the gradient scaler skipped) or weight in any
        process stops them all with an error, a signal in any process with a save. Returns the signal (0: none)."""
        ctx, scaled = self.ctx, self.ctx.scaler.is_enabled()
        flags = torch.tensor([0.0, 0.0, float(self.stop.signal or 0), 0.0], dtype=ctx.acc_dtype, device=ctx.device)
        if not scaled:  # under the fp16 scaler a non-finite loss is a step it skips
            flags[0] = (self.bad_step >= 0).to(ctx.acc_dtype)
        # a finite loss can still come with non-finite gradients: the weights are what a save would keep
        weights = torch.stack([p.detach().float().sum() for p in self.model.parameters()])
        flags[1] = (~torch.isfinite(weights).all()).to(ctx.acc_dtype)
        flags[3] = self.skips[1].to(ctx.acc_dtype)
        ctx.all_reduce(flags, op="max")
        bad_loss, bad_weights, signum, skipped = flags.tolist()
        if bad_loss or bad_weights or skipped >= MAX_SKIPPED:
            raise UserError(self.failure(epoch, bad_loss, bad_weights, int(skipped)))
        return int(signum)

    def failure(self, epoch, bad_loss, bad_weights, skipped):
        """The one line that ends a run whose loss or weights are not finite (fp16: whose steps are all skipped)."""
        step, now = int(self.bad_step.item()), f"at epoch {epoch + 1}, by step {self.state['step']}"
        first = None
        if step >= 0:
            terms = ", ".join(f"{k}={v.item():.4g}" for k, (v, at) in self.bad_terms.items() if at.item() == step)
            first = f"step {step} ({terms})"
        if bad_loss:
            what = f"loss is not finite at epoch {epoch + 1}, {first}" if first else \
                f"loss is not finite {now}, in another process"
        elif bad_weights and first:  # under fp16: a non-finite loss came first, its step skipped
            what = f"the weights are not finite {now}; the first non-finite loss at {first}"
        elif bad_weights:
            what = f"the weights are not finite (the losses were) {now}"
        else:
            what = (f"fp16: the gradient scaler skipped {skipped} steps in a row, {now} (each skip halves its scale: "
                    "the loss or the gradients are not finite at any scale)"
                    + (f"; the first non-finite loss at {first}" if first else ""))
        fix = "; or train in bf16 or fp32 (--amp bf16, --amp off)" if self.ctx.scaler.is_enabled() else ""
        return (f"{what}; {self.out / 'last.pt'} was left as it was; lower --lr or the weight of the term that is not "
                f"finite (--lam, --ent, ...) and start again (another --out), e.g. from "
                f"{self.out / next(iter(self.phase.best), 'last.pt')} with --init or --weights{fix}")

    def optimize(self, loss):
        """Backward and every optimiser's step. Under fp16 returns whether the gradient scaler skipped the step, for
        any of the optimisers (a device tensor: it keeps no public record of it, but halves its one scale exactly
        then), else None."""
        scaler = self.ctx.scaler
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        extra_params = [p for optimizer in self.optimizers[1:] for group in optimizer.param_groups
                        for p in group["params"] if p.grad is not None]
        self.ctx.average_gradients(extra_params)  # DDP averages the model's; a method's own modules need it too
        for optimizer in self.optimizers:
            # an optimiser whose parameters got no gradient this step (a module updated every k steps) is left
            # alone: stepping it would move Adam's moments, and the fp16 scaler refuses it
            if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
                scaler.step(optimizer)
        scale = scaler._scale.clone() if scaler.is_enabled() else None
        scaler.update()
        self.scheduler.step()
        if self.phase.after_step is not None:
            self.phase.after_step(self.scheduler.last_epoch)
        return None if scale is None else scaler._scale < scale

    def end_of_epoch(self, epoch, sums):
        """Validate, add the metrics row, write the improved best files, last.pt and metrics.csv."""
        ctx, state, best = self.ctx, self.state, self.phase.best
        train_seconds = time.time() - sums.started
        row = {"epoch": epoch + 1, **sums.means(self.steps_per_epoch * ctx.world)}
        if not ctx.sync_bn:  # each process has its own running statistics: rank 0's are validated and saved
            ctx.broadcast(*self.model.buffers())
        row.update(self.phase.validate(self.model))
        row["train_seconds"] = round(train_seconds, 2)
        row["seconds"] = round(time.time() - sums.started, 2)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["precision"] = ctx.amp  # this session's: a run resumed on another device may change it
        state.update(epoch=epoch + 1, step=0, partial=None)
        state["history"].append(row)
        improved = [name for name, key in best.items() if row[key] > state["best"].get(key, -1.0)]
        for name in improved:
            state["best"][best[name]] = row[best[name]]
        if ctx.main:  # best files before last.pt: a kill in between replays the epoch and writes them again
            for name in improved:
                save_checkpoint(self.out / name, self.weights(row))
            save_checkpoint(self.out / "last.pt", self.checkpoint())
            write_metrics(self.out / "metrics.csv", state["history"])
        ctx.print("epoch {epoch}: ".format(**row) + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr") and isinstance(v, float))
            + (f"  (new best: {', '.join(improved)})" if improved else ""))


class EpochSums:
    """The running sums of an epoch's logged terms and its training confusion matrix, kept on the device.

    A mid-epoch checkpoint holds the sums of all processes: on resume rank 0 takes them back and the
    others start from 0, so the all-reduced totals are right again."""

    def __init__(self, ctx, partial):
        partial = partial or {"sums": {}, "train_cm": None, "seconds": 0.0}
        share = 1 if ctx.main else 0
        self.ctx = ctx
        self.train_cm = ConfusionMatrix(device=ctx.device)
        if partial["train_cm"] is not None:
            self.train_cm.mat += partial["train_cm"].to(ctx.device) * share
        self.values = {k: torch.tensor(v * share, dtype=ctx.acc_dtype, device=ctx.device)
                       for k, v in partial["sums"].items()}
        self.inherited = {k: v * share for k, v in partial["sums"].items()}
        self.started = time.time() - partial["seconds"]

    def add(self, logs, skipped=None):
        """One step's logged terms; under fp16 (skipped given) a step the gradient scaler skipped adds its count
        instead: it did not train, and its terms may not be finite."""
        if skipped is not None:
            logs = {**{k: torch.where(skipped, 0.0, v.detach().float()) for k, v in logs.items()}, SKIPPED: skipped}
        for k, v in logs.items():
            v = v.detach().to(self.ctx.acc_dtype)
            self.values[k] = self.values[k] + v if k in self.values else v.clone()  # its own storage: reduced in place

    def means(self, steps):
        """{column: mean over the epoch's steps of all processes (those that trained, under fp16), 'train_miou':
        the epoch's running mIoU, and under fp16 'skipped_steps'}."""
        self.ctx.all_reduce(self.train_cm.mat)
        self.ctx.all_reduce(*self.values.values())
        totals = {k: v.item() for k, v in self.values.items()}
        skipped = totals.pop(SKIPPED, None)
        row = {k: v / max(1, steps - (skipped or 0)) for k, v in totals.items()}
        row["train_miou"] = self.train_cm.compute()[1]
        if skipped is not None:  # every process skips the same steps (their gradients are averaged first)
            row[SKIPPED] = round(skipped / self.ctx.world)
        return row


def adam(params, lr, device, **kwargs):
    """Adam; on CUDA the fused kernel: faster, and it takes the fp16 scaler's overflow check on the device,
    where the default one reads it back to the host at every step (a method's own optimisers should too)."""
    return torch.optim.Adam(params, lr=lr, fused=True if device.type == "cuda" else None, **kwargs)


def load_optimizer(optimizer, state):
    """optimizer.load_state_dict(state) with this session's implementation switches: load_state_dict puts the
    saved ones back, and a checkpoint from a CPU or a Mac (not fused) would break a fused CUDA Adam's first fp16
    step, or silently unfuse it. Adam's step counts then go where this session's kernels keep them."""
    mine = [{k: group[k] for k in IMPLEMENTATION if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, switches in zip(optimizer.param_groups, mine):
        group.update(switches)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):  # fused and capturable kernels count on the parameter's device, others on the CPU
                optimizer.state[p]["step"] = step.to(p.device if group.get("fused") or group.get("capturable") else "cpu")


def compiled(module, device):
    """torch.compile(module), or the module itself with one warning where compiling does not work here (no C
    compiler, a backend without inductor): a probe compiles a one-line function first."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # whatever the toolchain raises, training goes on eagerly
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        print(f"warning: --compile: torch.compile does not work on {device.type} here ({reason}); training "
              "without it", file=sys.stderr)
        return module
    return torch.compile(module)


# ----------------------------------------------------------------------------- files

def write_metrics(path, history):
    columns = list(dict.fromkeys(k for row in history for k in row))

    def write(f):
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(history)
    atomic_write(path, write, mode="w")


def plain_args(args):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def resumable_checkpoint(path, args, phase, config):
    """The checkpoint at path, if it continues this very run (same phase, model and settings)."""
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UserError(f"{path}: holds weights only (a best file); --resume continues from a run's last.pt "
                        "(start from this file with --init or --weights)")
    if ckpt.get("phase") != phase.name:
        raise UserError(f"{path}: was written by {SCRIPTS.get(ckpt.get('phase'), 'something else')}; --resume "
                        f"continues a {SCRIPTS.get(phase.name, phase.name)} run"
                        + (" (a phase-1 checkpoint goes to --init)" if phase.name == "mmd" else ""))
    if ckpt.get("config") != config:
        got = ckpt.get("config", {})
        raise UserError(f"{path}: is a {got.get('model')}/{got.get('backbone')} checkpoint, not "
                        f"{config['model']}/{config['backbone']}; resume with the same --model and --backbone")
    saved, now = {**phase.before, **ckpt.get("args", {})}, plain_args(args)
    keys = RESUME_MUST_MATCH + tuple(phase.resume_keys) + (("epochs",) if args.scheduler == "poly" else ())
    flag = lambda k: "--" + k.replace("_", "-")
    differ = [k for k in keys if k in saved and k in now and saved[k] != now[k]]
    if differ:
        raise UserError(f"{path}: that run used " + ", ".join(f"{flag(k)} {saved[k]}" for k in differ)
                        + "; resume with the same values, or start another --out")
    # a checkpoint older than a method's argument ran without that method (new methods are off by default)
    newer = [k for k in keys if k not in saved and now.get(k) not in (None, False, 0)]
    if newer:
        raise UserError(f"{path}: that run predates " + ", ".join(flag(k) for k in newer) + " (it ran without "
                        "it); resume without it, or start another --out")
    return ckpt


def lr_factor(step, total, poly, warmup):
    """The learning rate's multiplier for the step after `step` steps: poly's (1 - step/total)^0.9 (or 1),
    times a linear warmup (step + 1) / warmup over the first `warmup` steps (DAFormer's shape, which starts
    from 1e-6 of the rate; this one from 1/warmup, so that no step is wasted)."""
    factor = max(0.0, 1 - step / total) ** 0.9 if poly else 1.0
    return factor * min(1.0, (step + 1) / warmup) if warmup else factor
