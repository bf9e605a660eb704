"""The training engine on its own: the data order (ShardSampler) and a method with state of its own."""
import argparse
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing

import engine
from utils import Context, UserError


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_cover_one_seeded_permutation(world):
    n = 20
    shards = [list(engine.ShardSampler(n, seed=5, rank=r, world=world)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert all(len(s) == n // world for s in shards)
    assert len(set(flat)) == len(flat) == (n // world) * world  # nobody sees an image twice in an epoch
    whole = list(engine.ShardSampler(n, seed=5))
    assert flat == whole[:len(flat)]  # together the ranks walk the single-process order
    assert whole != list(range(n)) and sorted(whole) == list(range(n))


def test_order_depends_on_seed_and_epoch_only():
    a, b = engine.ShardSampler(30, seed=1), engine.ShardSampler(30, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(engine.ShardSampler(30, seed=2)) != list(engine.ShardSampler(30, seed=1))
    assert list(engine.ShardSampler(30, seed=1, salt="target")) != list(engine.ShardSampler(30, seed=1))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_mid_epoch_start_continues_the_same_order(world):
    for rank in range(world):
        full = engine.ShardSampler(17, seed=3, rank=rank, world=world)
        full.set_epoch(4)
        part = engine.ShardSampler(17, seed=3, rank=rank, world=world)
        part.set_epoch(4, start=3)
        assert list(part) == list(full)[3:] and len(part) == len(full) - 3


def test_a_longer_stream_cycles_through_fresh_permutations():
    s = engine.ShardSampler(6, seed=0, rank=1, world=2, per_rank=10)
    order = list(s)
    assert len(order) == len(s) == 10
    both = list(engine.ShardSampler(6, seed=0, rank=0, world=2, per_rank=10)) + order
    cycles = [both[i:i + 6] for i in range(0, 18, 6)]
    assert all(sorted(c) == list(range(6)) for c in cycles)  # whole permutations, one after another
    assert cycles[0] != cycles[1]


class Numbers(torch.utils.data.Dataset):
    """(x, y) pairs where y is a fixed linear function of x; flip_seed as the real datasets have."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.flip_seed = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def run_with_a_teacher(out, epochs, session_epochs=None, resume=None, signal_at_step=None):
    """A method with state of its own, as an adaptation method would have: an EMA teacher of the model
    and a second model with its own optimiser ('critic'), both handed to the engine in Phase.extra.
    signal_at_step: SIGTERM arrives during that step (counted from 1 in this call)."""
    args = argparse.Namespace(out=str(out), epochs=epochs, batch_size=4, scheduler="poly", resume=resume,
                              session_epochs=session_epochs, save_every_steps=0, seed=0, device="cpu", amp="off",
                              lr=0.01)
    ctx = Context(args)
    model, critic = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    teacher = torch.nn.Linear(4, 1)
    teacher.load_state_dict(model.state_dict())
    start = teacher.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.1, momentum=0.9)
    loader = engine.make_loader(Numbers(), ctx, args.batch_size, 0, seed=0)

    steps = [0]

    def step(net, batches, train_cm):
        steps[0] += 1
        if steps[0] == signal_at_step:
            signal.raise_signal(signal.SIGTERM)
        x, y = batches[0]
        loss = (net(x).squeeze(1) - y).pow(2).mean()
        critic_loss = (critic(x).squeeze(1) - teacher(x).squeeze(1).detach()).pow(2).mean()
        return loss + critic_loss, {"loss": loss, "critic_loss": critic_loss}

    @torch.no_grad()
    def ema():
        for t, p in zip(teacher.parameters(), model.parameters()):
            t.mul_(0.9).add_(p, alpha=0.1)

    @torch.no_grad()
    def validate(m):
        return {"score": -float((m(loader.dataset.x).squeeze(1) - loader.dataset.y).pow(2).mean())}

    phase = engine.Phase("seg", step, validate, best={"best.pt": "score"}, after_step=ema,
                         extra={"teacher": teacher, "critic": critic, "critic_optimizer": critic_optimizer})
    state = engine.fit(ctx, args, model, optimizer, [loader], phase, {"model": "linear"})
    return state, model, teacher, critic, critic_optimizer, start


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


def _train_one_rank(rank, world, port, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _, model, teacher, critic, _, _ = run_with_a_teacher(out / "run", epochs=1)
    torch.save({"model": model.state_dict(), "teacher": teacher.state_dict(), "critic": critic.state_dict()},
               out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_under_ddp_every_process_ends_with_the_same_method_state(tmp_path):
    """DDP averages the model's gradients; the engine must average those of the method's own modules too,
    or each process trains its own critic and last.pt holds rank 0's alone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_train_one_rank, args=(2, port, tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("model", "teacher", "critic"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
