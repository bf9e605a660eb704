"""Data order: which images each process reads at each step (rare class sampling and the class counts it
draws from included), and the loaders that read them.

The order of an epoch depends on (seed, epoch) only, so a resumed run, and every process of a torchrun run,
reads exactly the images a straight single-process run with the global batch would.
"""
import atexit
import multiprocessing
import signal

import numpy as np
import torch

from datasets import read_label
from files import atomic_write
from utils import NUM_CLASSES, UserError, hash_seed


class ShardSampler(torch.utils.data.Sampler):
    """A seeded order per epoch, shared between processes, that can start part way (mid-epoch resume).

    The order is cut into batches of `batch` that the `world` processes take in turn, so each step's global
    batch is the single-process run's batch of batch × world images (the same training, tested). Each takes
    per_rank // batch batches; when the order is shorter than that (phase 2's target stream following the
    source), further seeded permutations are appended. It yields (index, seed) pairs, seed a function of
    (seed, salt, epoch): the dataset draws a sample's randomness from the pair. draw(n, generator) replaces
    the permutation (rare class sampling: RareClassSampling).
    """

    def __init__(self, n, seed=0, rank=0, world=1, per_rank=None, salt=0, batch=1, draw=None):
        self.n, self.seed, self.rank, self.world, self.salt, self.batch = n, seed, rank, world, salt, batch
        self.draw = draw or (lambda n, g: torch.randperm(n, generator=g).tolist())
        per_rank = per_rank if per_rank is not None else n // world
        self.steps = per_rank // batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order, cycle, b = [], 0, self.batch
        while len(order) < self.steps * b * self.world:
            g = torch.Generator().manual_seed(hash_seed(self.seed, self.salt, self.epoch, cycle))
            # an image met again in a later permutation gets other random flips and crops
            seed = hash_seed(self.seed, self.salt, "sample", self.epoch, *([cycle] if cycle else []))
            order += [(i, seed) for i in self.draw(self.n, g)]
            cycle += 1
        starts = [(k * self.world + self.rank) * b for k in range(self.steps)]  # this process's batch of each step
        mine = [key for s in starts for key in order[s:s + b]]
        return iter(mine[self.start:])

    def __len__(self):
        return self.steps * self.batch - self.start


def class_counts(dataset):
    """Pixels of each class (trainIds 0..18) in each label at the dataset's size, N×19 int64: what rare class
    sampling draws from. With --cache, counted once from the cached labels and kept beside them; without it,
    counted from the label files at each start (labels only, no image decoded)."""
    count = lambda label: np.bincount(np.asarray(label).ravel(), minlength=256)[:NUM_CLASSES]
    if dataset.cache_files is None:
        return np.stack([count(read_label(path, dataset.size, train_ids)) for _, _, path, train_ids in dataset.items])
    path = dataset.cache_files[1].with_name(dataset.cache_files[1].name.replace(".labels.npy", ".classes.npy"))
    if not path.exists():  # every process of a torchrun counts alike; the rename makes one file whole
        counts = np.stack([count(label) for label in np.load(dataset.cache_files[1], mmap_mode="r")])
        atomic_write(path, lambda f: np.save(f, counts))
    return np.load(path)


class RareClassSampling:
    """DAFormer's rare class sampling (Hoyer et al. 2022) of source images: a class c with probability
    softmax((1 - f_c) / T) over the classes, f_c its share of the labelled pixels, then uniformly an image with
    at least min_pixels pixels of c (at least 1). Classes no image holds that many of are left out.
    Called with a torch.Generator, it draws n indices: ShardSampler's order for an epoch."""

    def __init__(self, counts, temperature, min_pixels):
        counts = np.asarray(counts, np.float64)
        self.images = [np.flatnonzero(counts[:, c] >= max(1, min_pixels)) for c in range(counts.shape[1])]
        self.classes = [c for c in range(counts.shape[1]) if len(self.images[c])]
        if not self.classes:
            raise UserError("rare class sampling: no source label holds any class; check the GTA-V labels")
        freq = counts.sum(0)[self.classes] / counts.sum()
        logits = (1 - freq) / temperature
        weights = np.exp(logits - logits.max())  # the softmax, shifted: at T = 0.01 exp(logits) overflows
        self.probs = weights / weights.sum()

    def __call__(self, n, generator):
        classes = torch.multinomial(torch.from_numpy(self.probs), n, replacement=True, generator=generator).tolist()
        picks = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        return [int(self.images[self.classes[c]][int(u * len(self.images[self.classes[c]]))])
                for c, u in zip(classes, picks)]


def _quiet_worker(_):
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the main process saves at its next
    # check, its workers must live until then (and end with it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def _end_workers():
    """Loader workers still alive at exit are ended here. An error raised while a loader was being read
    keeps its iterator in a reference cycle, which nothing collects before exit; multiprocessing's own
    exit hook would then terminate() its workers with the SIGTERM they ignore and wait for them forever.
    This hook runs before that one (atexit runs the last registered first; multiprocessing registered when
    torch was imported). Killed, not asked: collected, the iterator would ask them to stop and wait 5 s for each
    answer, twice."""
    alive = [w for w in multiprocessing.active_children() if w.daemon]  # DataLoader workers are daemonic
    if alive:
        handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's would report each kill as an error
        for worker in alive:
            worker.kill()
            worker.join(5)
        signal.signal(signal.SIGCHLD, handler)  # for the loaders that come after (the tests call this in-process)


def make_loader(dataset, ctx, batch_size, workers, seed=0, train=True, per_rank=None, salt=0, draw=None):
    """Training: a ShardSampler, full batches only; the dataset takes (index, seed) keys; the workers live
    across epochs, since nothing is pushed into them. Evaluation: every image exactly once across processes;
    its workers start for each pass (phase 2 has two such loaders beside two training ones)."""
    if train:
        sampler = ShardSampler(len(dataset), seed, ctx.rank, ctx.world, per_rank, salt, batch_size, draw)
    else:
        sampler = list(range(ctx.rank, len(dataset), ctx.world))
        dataset.skip_bad = False  # a stand-in image would be scored twice: only unpaired files may be left out
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_quiet_worker, persistent_workers=train and workers > 0)
