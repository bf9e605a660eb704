"""The training engine on its own: the data order (ShardSampler) and a method with state of its own."""
import copy
import csv
import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing

import batchnorm
import engine
import flags
import sampling
import devices
import utils
from losses import SegLoss
from devices import Context
from utils import ArgumentParser, UserError


def indices(sampler):
    return [i for i, _ in sampler]


@pytest.mark.parametrize("world,batch", [(1, 1), (2, 2), (3, 2)])
def test_each_steps_global_batch_is_the_single_process_batch(world, batch):
    """Under DDP the processes' batches of a step, together, are the batch of one process with batch × world:
    the same images in the same steps (what makes DDP train like one process)."""
    n = 20
    shards = [indices(sampling.ShardSampler(n, seed=5, rank=r, world=world, batch=batch)) for r in range(world)]
    steps = n // world // batch
    assert all(len(s) == steps * batch for s in shards)
    whole = indices(sampling.ShardSampler(n, seed=5, batch=batch * world))
    global_batches = [[i for s in shards for i in s[k * batch:(k + 1) * batch]] for k in range(steps)]
    assert [i for b in global_batches for i in b] == whole[:steps * batch * world]
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat)  # nobody sees an image twice in an epoch
    permutation = indices(sampling.ShardSampler(n, seed=5))
    assert permutation != list(range(n)) and sorted(permutation) == list(range(n))


def test_order_depends_on_seed_and_epoch_only():
    a, b = sampling.ShardSampler(30, seed=1), sampling.ShardSampler(30, seed=1)
    assert indices(a) == indices(b)
    a.set_epoch(1)
    assert indices(a) != indices(b)
    b.set_epoch(1)
    assert indices(a) == indices(b)
    assert indices(sampling.ShardSampler(30, seed=2)) != indices(sampling.ShardSampler(30, seed=1))
    assert indices(sampling.ShardSampler(30, seed=1, salt="target")) != indices(sampling.ShardSampler(30, seed=1))


def test_sample_seeds_are_the_epochs_and_the_same_in_every_process():
    def seeds(epoch, rank=0, salt=0, start=0):
        s = sampling.ShardSampler(12, seed=1, rank=rank, world=2, salt=salt)
        s.set_epoch(epoch, start)
        return {seed for _, seed in s}
    assert len(seeds(0)) == 1 and seeds(0) == seeds(0, rank=1) == seeds(0, start=4)
    assert seeds(0) != seeds(1) and seeds(0) != seeds(0, salt="target")


@pytest.mark.parametrize("world,batch", [(1, 1), (2, 1), (3, 2)])
def test_mid_epoch_start_continues_the_same_order(world, batch):
    for rank in range(world):
        full = sampling.ShardSampler(17, seed=3, rank=rank, world=world, batch=batch)
        full.set_epoch(4)
        part = sampling.ShardSampler(17, seed=3, rank=rank, world=world, batch=batch)
        part.set_epoch(4, start=3)
        assert indices(part) == indices(full)[3:] and len(part) == len(full) - 3


def test_a_longer_stream_cycles_through_fresh_permutations():
    r0, r1 = (indices(sampling.ShardSampler(6, seed=0, rank=r, world=2, per_rank=10)) for r in range(2))
    assert len(r0) == len(r1) == 10
    both = [i for pair in zip(r0, r1) for i in pair]  # the steps' global batches, one after another
    cycles = [both[i:i + 6] for i in range(0, 18, 6)]
    assert all(sorted(c) == list(range(6)) for c in cycles)  # whole permutations, one after another
    assert cycles[0] != cycles[1]
    # an image met again in a later permutation is flipped and cropped afresh: each permutation has its seed
    keys = [k for r in range(2) for k in sampling.ShardSampler(6, seed=0, rank=r, world=2, per_rank=10)]
    assert len({seed for _, seed in keys}) == 4  # 2 x 10 keys: from permutations of 6, 6, 6 and 2
    assert len(set(keys)) == 20  # no (image, seed) twice


class Numbers(torch.utils.data.Dataset):
    """(x, y) pairs where y is a fixed linear function of x; keys as the real datasets take them."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i, _ = key  # (index, seed) from the training sampler
        return self.x[i], self.y[i]


def train_args(out, *extra):
    """The flags the engine reads, parsed by the training scripts' own parser: batch 4, lr 0.01, on the CPU, fp32."""
    parser = ArgumentParser()
    flags.add_train_args(parser, epochs=1, batch_size=4)
    return parser.parse_args([str(f) for f in ("--out", out, "--lr", "0.01", "--device", "cpu", "--amp", "off", *extra)])


def run_with_a_teacher(out, epochs, session_epochs=None, resume=None, signal_at_step=None, log_every=5,
                       compile=False):
    """A method with state of its own, as an adaptation method would have: an EMA teacher of the model
    and a second model with its own optimiser ('critic'), both handed to the engine in Phase.extra.
    signal_at_step: SIGTERM arrives during that step (counted from 1 in this call)."""
    args = train_args(out, "--epochs", epochs, "--scheduler", "poly", "--log-every", log_every,
                      *(["--resume", resume] if resume else []), *(["--compile"] if compile else []),
                      *(["--session-epochs", session_epochs] if session_epochs else []))
    ctx = Context(args)
    model, critic = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    teacher = torch.nn.Linear(4, 1)
    teacher.load_state_dict(model.state_dict())
    start = teacher.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.1, momentum=0.9)
    loader = sampling.make_loader(Numbers(), ctx, args.batch_size, 0, seed=0)

    steps = [0]

    def step(net, batches, train_cm):
        steps[0] += 1
        if steps[0] == signal_at_step:
            signal.raise_signal(signal.SIGTERM)
        x, y = batches[0]
        loss = (net(x).squeeze(1) - y).pow(2).mean()
        critic_loss = (critic(x).squeeze(1) - teacher(x).squeeze(1).detach()).pow(2).mean()
        return loss + critic_loss, {"loss": loss, "critic_loss": critic_loss}

    taken = []

    @torch.no_grad()
    def ema(steps):
        taken.append(steps)
        for t, p in zip(teacher.parameters(), model.parameters()):
            t.mul_(0.9).add_(p, alpha=0.1)

    @torch.no_grad()
    def validate(m):
        return {"score": -float((m(loader.dataset.x).squeeze(1) - loader.dataset.y).pow(2).mean())}

    phase = engine.Phase("seg", step, validate, best={"best.pt": "score"}, after_step=ema,
                         extra={"teacher": teacher, "critic": critic, "critic_optimizer": critic_optimizer})
    state = engine.fit(ctx, args, model, optimizer, [loader], phase, {"model": "linear"})
    return state, model, teacher, critic, critic_optimizer, start, taken


def test_a_method_with_its_own_modules_and_optimiser_resumes_exactly(tmp_path):
    state, *straight = run_with_a_teacher(tmp_path / "straight", epochs=3)
    assert state["epoch"] == 3 and [r["epoch"] for r in state["history"]] == [1, 2, 3]
    first, *_ = run_with_a_teacher(tmp_path / "sessions", epochs=3, session_epochs=1)
    assert first["epoch"] == 1
    _, *resumed = run_with_a_teacher(tmp_path / "sessions", epochs=3, resume="last")
    for a, b in zip(straight[:3], resumed[:3]):  # model, teacher, critic
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # the critic's optimiser was stepped by the engine (its momentum is there) and restored on resume
    a, b = straight[3].state_dict()["state"], resumed[3].state_dict()["state"]
    assert a and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
    # after_step ran: the teacher moved from where it started, behind the model
    model, teacher, start = straight[0].weight, straight[1].weight, straight[4]
    assert not torch.equal(teacher, start) and not torch.equal(teacher, model)
    # given the steps taken so far, counted across the sessions (an EMA ramp reads it)
    steps = straight[5]
    assert steps == list(range(1, len(steps) + 1)) and resumed[5] == steps[len(steps) // 3:]


def test_resume_refuses_a_checkpoint_without_the_methods_state(tmp_path):
    run_with_a_teacher(tmp_path / "run", epochs=2, session_epochs=1)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt["extra"]["critic"]
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(UserError, match="holds no state for critic"):
        run_with_a_teacher(tmp_path / "run", epochs=2, resume="last")


def test_a_method_with_its_own_state_resumes_exactly_after_a_signal_mid_epoch(tmp_path):
    _, *straight = run_with_a_teacher(tmp_path / "straight", epochs=2)
    with pytest.raises(SystemExit) as stopped:
        run_with_a_teacher(tmp_path / "cut", epochs=2, signal_at_step=8)  # epochs of 6 steps: the 2nd of epoch 2
    assert stopped.value.code == 128 + signal.SIGTERM
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2) and set(saved["extra"]) == {"teacher", "critic", "critic_optimizer"}
    _, *resumed = run_with_a_teacher(tmp_path / "cut", epochs=2, resume="last")
    for a, b in zip(straight[:3], resumed[:3]):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _train_one_rank(rank, world, port, out, signal_at_step=None):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:  # only rank 1 is signalled
        _, model, teacher, critic, *_ = run_with_a_teacher(out / "run", epochs=1, log_every=2,
                                                             signal_at_step=signal_at_step if rank == 1 else None)
    except SystemExit as e:
        (out / f"rank{rank}.exit").write_text(str(e.code))
        return
    torch.save({"model": model.state_dict(), "teacher": teacher.state_dict(), "critic": critic.state_dict()},
               out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_ddp_every_process_ends_with_the_same_method_state(tmp_path):
    """DDP averages the model's gradients; the engine must average those of the method's own modules too,
    or each process trains its own critic and last.pt holds rank 0's alone."""
    torch.multiprocessing.spawn(_train_one_rank, args=(2, free_port(), tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("model", "teacher", "critic"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.slow
def test_under_ddp_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    """Rank 1 alone gets SIGTERM in step 1; the processes agree at the next check (--log-every 2): both
    stop after step 2 with a saved last.pt, none waits forever for the other."""
    torch.multiprocessing.spawn(_train_one_rank, args=(2, free_port(), tmp_path, 1), nprocs=2)
    assert [(tmp_path / f"rank{r}.exit").read_text() for r in range(2)] == [str(128 + signal.SIGTERM)] * 2
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 2)


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, capsys):
    _, *eager = run_with_a_teacher(tmp_path / "eager", epochs=1)
    torch._dynamo.reset()
    _, *compiled = run_with_a_teacher(tmp_path / "compiled", epochs=1, compile=True)
    assert "--compile" not in capsys.readouterr().err  # it did compile
    for a, b in zip(eager[:3], compiled[:3]):  # model, teacher, critic: fused kernels may round differently
        assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(a.state_dict().values(),
                                                                               b.state_dict().values()))
    assert not torch.equal(eager[0].weight, eager[4])  # training moved the weights being compared
    saved = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)["model"]
    assert list(saved) == list(eager[0].state_dict())  # no "_orig_mod." names: --init and evaluate.py read it


def test_compile_falls_back_to_eager_with_one_warning_where_it_cannot_compile(tmp_path, monkeypatch, capsys):
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))
    torch._dynamo.reset()
    _, *fallback = run_with_a_teacher(tmp_path / "fallback", epochs=1, compile=True)
    warning = [l for l in capsys.readouterr().err.splitlines() if "--compile" in l]
    assert len(warning) == 1 and "does not work on cpu here" in warning[0] and "c++" in warning[0], warning
    _, *eager = run_with_a_teacher(tmp_path / "eager", epochs=1)
    assert torch.equal(fallback[0].weight, eager[0].weight)  # the eager path itself, bit for bit


def fit_linear(out, loss_fn, log_every=50, amp=None, extra=()):
    """One epoch (6 steps) of a linear model whose step returns loss_fn(net, x, y, step) -> (loss, logs). amp:
    the precision set after --amp off was resolved ('fp16': the gradient scaler, which PyTorch has on the CPU too)."""
    args = train_args(out, "--log-every", log_every, *extra)
    ctx = Context(args)
    if amp:
        ctx.set_amp(amp)
    model = torch.nn.Linear(4, 1)
    loader = sampling.make_loader(Numbers(), ctx, args.batch_size, 0, seed=0)
    steps = [0]

    def step(net, batches, train_cm):
        steps[0] += 1
        x, y = batches[0]
        return loss_fn(net, x, y, steps[0])

    phase = engine.Phase("seg", step, lambda m: {"score": 0.0}, best={"best.pt": "score"})
    return engine.fit(ctx, args, model, torch.optim.Adam(model.parameters(), lr=args.lr), [loader], phase, {})


def test_a_non_finite_loss_is_reported_with_the_terms_its_step_logged(tmp_path):
    """Read back only at the epoch's end, step 3's loss is still named, with the terms step 3 logged: 'b' is
    logged on even steps only, so it is not among them, and later steps' values do not overwrite step 3's."""
    def loss_fn(net, x, y, step):
        a = (net(x).squeeze(1) - y).pow(2).mean() * (float("nan") if step == 3 else 1.0)
        logs = {"a": a} if step % 2 else {"a": a, "b": a.detach() * 0 + step}
        return a, logs
    with pytest.raises(UserError, match=r"^loss is not finite at epoch 1, step 3 \(a=nan\);") as e:
        fit_linear(tmp_path / "run", loss_fn)
    assert "b=" not in str(e.value) and not (tmp_path / "run" / "last.pt").exists()


def test_non_finite_weights_after_a_finite_loss_are_never_saved(tmp_path):
    """sqrt(|w - w|) is 0 with an infinite slope: in the epoch's last step, a finite loss whose gradient
    makes the weights NaN, which no later loss would reveal before the epoch's files are written."""
    def loss_fn(net, x, y, step):
        fit = (net(x).squeeze(1) - y).pow(2).mean()
        kink = torch.sqrt((net.weight - net.weight.detach()).abs().sum()) if step == 6 else 0.0
        return fit + kink, {"fit": fit}
    with pytest.raises(UserError, match="the weights are not finite \\(the losses were\\) at epoch 1, by step 6"):
        fit_linear(tmp_path / "run", loss_fn)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_under_fp16_a_step_the_scaler_skips_is_counted_not_fatal(tmp_path):
    """Steps 2 and 4 overflow (an infinite loss): the scaler skips them, the run goes on, metrics.csv counts them
    and averages the terms over the 4 steps that trained. (The loss is small: at the scaler's first scale, 2^16,
    no other step's fp16 gradients overflow.)"""
    seen = {}

    def loss_fn(net, x, y, step):
        a = (net(x).squeeze(1) - y).pow(2).mean() * 1e-3
        seen[step] = a.item()
        a = a * float("inf") if step in (2, 4) else a
        return a, {"a": a}
    state = fit_linear(tmp_path / "run", loss_fn, amp="fp16")
    row = state["history"][-1]
    assert row["skipped_steps"] == 2 and row["precision"] == "fp16"
    assert row["a"] == pytest.approx(sum(seen[k] for k in (1, 3, 5, 6)) / 4)
    seen.clear()
    fit = lambda net, x, y, step: (lambda a: (a, {"a": a}))((net(x).squeeze(1) - y).pow(2).mean())
    row = fit_linear(tmp_path / "fp32", fit)["history"][-1]
    assert "skipped_steps" not in row and row["precision"] == "off"


def test_under_fp16_many_skipped_steps_in_a_row_stop_the_run_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "MAX_SKIPPED", 4)

    def loss_fn(net, x, y, step):
        a = (net(x).squeeze(1) - y).pow(2).mean() * (float("inf") if step >= 2 else 1e-3)
        return a, {"a": a}
    with pytest.raises(UserError) as e:
        fit_linear(tmp_path / "run", loss_fn, amp="fp16")
    assert str(e.value).startswith("fp16: the gradient scaler skipped 5 steps in a row, at epoch 1, by step 6 ")
    assert "the first non-finite loss at step 2 (a=inf)" in str(e.value) and "--amp bf16" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "last.pt").exists()


def test_under_fp16_skipped_steps_in_a_row_are_counted_across_epochs_and_sessions(tmp_path, monkeypatch):
    """Epochs of 6 steps, every one skipped from step 4 on: 3 at the end of session 1 (saved in last.pt), 9 by
    the end of session 2's first epoch, past a limit of 8 that no single epoch reaches."""
    monkeypatch.setattr(engine, "MAX_SKIPPED", 8)
    calls = [0]

    def loss_fn(net, x, y, step):
        calls[0] += 1
        a = (net(x).squeeze(1) - y).pow(2).mean() * (float("inf") if calls[0] >= 4 else 1e-3)
        return a, {"a": a}
    fit_linear(tmp_path / "run", loss_fn, amp="fp16", extra=("--epochs", "3", "--session-epochs", "1"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["skipped_in_a_row"] == 3
    with pytest.raises(UserError, match=r"^fp16: the gradient scaler skipped 9 steps in a row, at epoch 2, by step 6"):
        fit_linear(tmp_path / "run", loss_fn, amp="fp16", extra=("--epochs", "3", "--resume"))


def adam_state(**switches):
    """An Adam's state after one step, as a checkpoint holds it."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([p], lr=0.1, **switches)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    optimizer.step()
    return optimizer.state_dict()


def scaled_step(optimizer, p):
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p * torch.tensor([2.0, 1.0, -1.0])).sum()).backward()
    scaler.step(optimizer)
    scaler.update()


def test_an_optimiser_state_from_another_kind_of_device_keeps_this_sessions_kernels():
    """PyTorch's load_state_dict puts the saved implementation switches back: a CPU or Mac run's Adam (not fused)
    loaded into a fused one fails at the fp16 scaler's first step (reproduced here: the CPU has a fused Adam and
    a scaler too). engine.load_optimizer keeps this session's switches and steps like the Adam it continues."""
    unfused, fused = adam_state(), adam_state(fused=True)
    p = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.Adam([p], lr=0.1, fused=True)
    plain.load_state_dict(copy.deepcopy(unfused))
    with pytest.raises(AssertionError):  # "Expected grad_scale and found_inf to be None" (a bare assert in 2.8)
        scaled_step(plain, p)
    for saved, switches in ((unfused, {"fused": True}), (fused, {"foreach": False}), (fused, {})):
        q, reference = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        ours = torch.optim.Adam([q], lr=0.1, **switches)
        engine.load_optimizer(ours, copy.deepcopy(saved))  # loading shares the state's tensors: stepping moves them
        assert all(ours.param_groups[0][k] == v for k, v in switches.items())
        scaled_step(ours, q)
        continued = torch.optim.Adam([reference], lr=0.1)  # the same state, stepped without a scaler
        continued.load_state_dict(copy.deepcopy(unfused))
        reference.grad = torch.tensor([2.0, 1.0, -1.0])
        continued.step()
        assert torch.allclose(q, reference) and float(ours.state[q]["step"]) == 2


def _sync_bn_rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    x, w = bn_batch()
    bn = batchnorm.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))[0]
    mine = x.chunk(world)[rank].clone().requires_grad_()
    y = bn(mine)
    (y * w.chunk(world)[rank]).sum().backward()
    torch.save({"y": y.detach(), "grad_x": mine.grad, "grad_weight": bn.weight.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def bn_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 5, 6, generator=g) * 3 + 1, torch.randn(4, 3, 5, 6, generator=g)


@pytest.mark.slow
def test_sync_batchnorm_is_batchnorm_over_the_global_batch(tmp_path):
    """Two gloo processes with two images each against BatchNorm2d over all four: outputs, input gradients
    (which now flow between processes through the statistics), the summed weight gradient, and running
    statistics that are the same in both processes."""
    torch.multiprocessing.spawn(_sync_bn_rank, args=(2, free_port(), tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    x, w = bn_batch()
    x.requires_grad_()
    bn = torch.nn.BatchNorm2d(3)
    y = bn(x)
    (y * w).sum().backward()
    assert torch.allclose(torch.cat([a["y"], b["y"]]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([a["grad_x"], b["grad_x"]]), x.grad, atol=1e-5)
    assert torch.allclose(a["grad_weight"] + b["grad_weight"], bn.weight.grad, atol=1e-4)
    for k in ("running_mean", "running_var"):
        assert torch.equal(a[k], b[k]) and torch.allclose(a[k], getattr(bn, k), atol=1e-6), k
    per_process = torch.nn.BatchNorm2d(3)(x.detach()[:2])  # what each process alone would compute
    assert not torch.allclose(per_process, a["y"], atol=1e-2)


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 19, 1))


def seg_batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 6, 5, generator=g), torch.randint(0, 19, (4, 6, 5), generator=g)
    y[0, :2] = 255  # the processes' halves hold different numbers of labelled pixels
    return x, y


def _ddp_gradient_rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    net = torch.nn.parallel.DistributedDataParallel(batchnorm.sync_batchnorm(small_net()))
    x, y = seg_batch()
    SegLoss(0.3, reduce=batchnorm.SumOverRanks.apply)(net(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    torch.save({k: p.grad for k, p in net.module.named_parameters()}, out / f"rank{rank}.pt")
    del net  # DDP's reducer must go before the process group (see engine.Trainer.halt)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_are_the_single_process_gradients_of_the_global_batch(tmp_path):
    """The whole chain at once, as the training scripts run it: DDP averages over processes, SumOverRanks in
    the loss and in SyncBatchNorm multiplies by their number in backward, and what is left is the gradient
    one process computes on the whole batch. Adam would hide a constant factor; this compares gradients."""
    torch.multiprocessing.spawn(_ddp_gradient_rank, args=(2, free_port(), tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    net = small_net()
    x, y = seg_batch()
    SegLoss(0.3)(net(x), y).backward()
    for k, p in net.named_parameters():
        assert torch.equal(a[k], b[k]), k
        assert torch.allclose(a[k], p.grad, rtol=1e-4, atol=1e-7), (k, (a[k] - p.grad).abs().max())


def domain_batches():
    g = torch.Generator().manual_seed(2)
    xs, xt = torch.randn(4, 3, 6, 5, generator=g) * 2 + 1, torch.randn(4, 3, 6, 5, generator=g) - 2
    return xs, xt, torch.randint(0, 19, (4, 6, 5), generator=g)


def domain_step(net, model, xs, xt, ys, reduce=None):
    """Phase 2's shape under --bn domain: one pass over cat(source, target), the source loss summed over
    processes as train_mmd.py does, and a target-side term (a mean, which DDP's averaging makes global)."""
    with batchnorm.split_domains(model, len(xs)):
        logits = net(torch.cat([xs, xt]))
    n = len(xs)
    (SegLoss(0.3, reduce=reduce)(logits[:n], ys) + 0.1 * logits[n:].pow(2).mean()).backward()


def _domain_ddp_rank(rank, world, port, out, sync):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = batchnorm.use_mode(small_net(), "domain")
    net = torch.nn.parallel.DistributedDataParallel(batchnorm.sync_batchnorm(model) if sync else model)
    xs, xt, ys = domain_batches()
    domain_step(net, model, xs.chunk(world)[rank], xt.chunk(world)[rank], ys.chunk(world)[rank],
                batchnorm.SumOverRanks.apply)
    torch.save({"grads": {k: p.grad for k, p in model.named_parameters()}, "buffers": dict(model.named_buffers())},
               out / f"rank{rank}.pt")
    del net
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sync", [True, False], ids=["sync-bn", "no-sync-bn"])
def test_ddp_under_bn_domain_is_one_process_with_the_global_batch_of_each_domain(tmp_path, sync):
    """Two processes with 2 source + 2 target images each against one with 4 + 4: the same gradients and the
    same source and target running statistics, each domain's statistics taken over both processes' images.
    With --no-sync-bn each process normalises its own halves, which is not the same."""
    (tmp_path / str(sync)).mkdir()
    torch.multiprocessing.spawn(_domain_ddp_rank, args=(2, free_port(), tmp_path / str(sync), sync), nprocs=2)
    a, b = (torch.load(tmp_path / str(sync) / f"rank{r}.pt", weights_only=True) for r in range(2))
    model = batchnorm.use_mode(small_net(), "domain")
    domain_step(model, model, *domain_batches())
    grads, buffers = {k: p.grad for k, p in model.named_parameters()}, dict(model.named_buffers())
    assert {"1.target_mean", "1.target_var"} <= buffers.keys()
    same = (all(torch.allclose(a["grads"][k], g, rtol=1e-4, atol=1e-6) for k, g in grads.items())
            and all(torch.allclose(a["buffers"][k].float(), v.float(), atol=1e-5) for k, v in buffers.items()))
    assert same == sync
    if sync:
        assert all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in buffers)


def test_warmup_and_poly_multiply_and_resume_keeps_them():
    """lr_factor against the formulas written out: (step + 1) / warmup for the first warmup steps, times
    (1 - step/total)^0.9 under poly."""
    assert [engine.lr_factor(i, 10, False, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [engine.lr_factor(i, 10, False, 0) for i in range(3)] == [1.0, 1.0, 1.0]
    for i in range(12):
        want = max(0.0, 1 - i / 10) ** 0.9 * min(1.0, (i + 1) / 4)
        assert engine.lr_factor(i, 10, True, 4) == pytest.approx(want)
    assert engine.lr_factor(10, 10, True, 4) == 0.0
    assert "warmup" in engine.RESUME_MUST_MATCH


# ----------------------------------------------------------------------------- --amp auto

@pytest.mark.parametrize("cpu_flags,native", [("fpu sse2 avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                              ("fpu amx_bf16 amx_tile", True)])
def test_a_cpu_counts_as_native_bf16_only_with_avx512_bf16_or_amx(tmp_path, cpu_flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n\nprocessor\t: 1\nflags\t\t: {cpu_flags}\n")
    assert devices.native_bf16(torch.device("cpu"), cpuinfo=info) is native
    assert devices.native_bf16(torch.device("cpu"), cpuinfo=tmp_path / "absent") is False


@pytest.mark.parametrize("device,native,want", [("cpu", True, "bf16"), ("cpu", False, "off"),
                                                ("cuda", True, "bf16"), ("cuda", False, "fp16"),
                                                ("mps", True, "bf16"), ("mps", False, "fp16")])
def test_auto_is_bf16_where_native_fp16_on_an_older_gpu_and_fp32_on_an_emulating_cpu(monkeypatch, device, native,
                                                                                      want):
    monkeypatch.setattr(devices, "native_bf16", lambda d: native)
    mode, why = devices.resolve_amp("auto", torch.device(device))
    assert mode == want and why.startswith("auto: ")


@pytest.mark.parametrize("capability,native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_native_bf16_is_compute_capability_8(monkeypatch, capability, native):
    """T4 (7.5) and V100 (7.0) emulate bf16 though torch.cuda.is_bf16_supported() may say yes."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    assert devices.native_bf16(torch.device("cuda")) is native


def test_bf16_asked_for_on_an_emulating_cpu_warns_in_one_line_and_fp16_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(devices, "native_bf16", lambda d: False)
    assert devices.resolve_amp("bf16", torch.device("cpu"))[0] == "bf16"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--amp bf16" in err and "emulates" in err
    with pytest.raises(UserError, match="--amp fp16 needs a GPU"):
        devices.resolve_amp("fp16", torch.device("cpu"))


def test_auto_is_decided_for_each_sessions_device_and_each_session_is_recorded(toy, tmp_path, monkeypatch):
    """A Colab run begun on a CPU runtime (auto: fp32) and resumed on a GPU with bf16 trains there in bf16: the
    change is one line and a metrics.csv column; args.json keeps 'auto', last.pt each session. An explicit --amp
    is used as given; a run that trained in fp16 goes on here in this device's precision."""
    from conftest import TINY, call, data_args
    out = tmp_path / "run"
    common = ["--model", "unet", *TINY, *data_args(toy), "--batch-size", "4", "--amp", "auto", "--out", out]
    monkeypatch.setattr(devices, "native_bf16", lambda d: False)
    r = call("train_seg.py", *common, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "precision: off (auto: this CPU only emulates bf16" in r.stdout.splitlines()[0]
    r = call("train_seg.py", *common, "--epochs", "2", "--resume")  # the same device: nothing changes
    assert r.returncode == 0 and "from here on" not in r.stdout
    monkeypatch.setattr(devices, "native_bf16", lambda d: True)
    r = call("train_seg.py", *common, "--epochs", "3", "--resume")
    assert r.returncode == 0, r.stderr
    changed = [l for l in r.stdout.splitlines() if "from here on" in l]
    assert changed == ["precision: bf16 from here on, off until now (--amp auto picks it for each session's device)"]
    assert json.loads((out / "args.json").read_text())["args"]["amp"] == "auto"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["args"]["amp"] == "auto" and [x["amp"] for x in ckpt["sessions"]] == ["off", "off", "bf16"]
    assert [(x["epoch"], x["device"]) for x in ckpt["sessions"]] == [(0, "cpu"), (1, "cpu"), (2, "cpu")]
    with open(out / "metrics.csv") as f:
        assert [row["precision"] for row in csv.DictReader(f)] == ["off", "off", "bf16"]
    asked = lambda amp: [*common, "--amp", amp]  # argparse keeps the last --amp
    r = call("train_seg.py", *asked("off"), "--epochs", "4", "--resume")
    assert r.returncode == 0 and "precision: off from here on, bf16 until now (as --amp off asks)" in r.stdout
    ckpt["sessions"][-1]["amp"] = "fp16"  # trained on a T4, resumed on a CPU runtime
    torch.save(ckpt, out / "fp16.pt")
    r = call("train_seg.py", *common, "--epochs", "4", "--resume", out / "fp16.pt")
    assert r.returncode == 0 and "precision: bf16 from here on, fp16 until now" in r.stdout, r.stderr
    r = call("train_seg.py", *asked("fp16"), "--epochs", "5", "--resume")
    assert r.returncode == 2 and "--amp fp16 needs a GPU" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("text,lost", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242", True),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:589] Read error: Connection reset by peer", True),
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error", False),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False)])
def test_only_a_peer_that_is_gone_becomes_the_lost_contact_line(text, lost):
    """Anything else that fails inside a collective (a CUDA error under NCCL, out of memory) keeps its traceback."""
    assert utils._is_communication_failure(RuntimeError(text)) is lost
