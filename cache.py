"""--cache: a dataset's images and labels decoded and resized once into two uint8 memmaps (numpy .npy files),
read from then on; at GTA-V resolution loading becomes some 200x faster, with the same arrays."""
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from files import process_alive
from devices import available_cpus
from utils import UserError


def attach(dataset, folder):
    """The (images, labels) .npy files of dataset's cache under folder, built first if missing: every image
    and label decoded and resized once into two uint8 memmaps, which the dataset reads afterwards. The file
    name hashes the size and each file's path, length and mtime, so a changed file list, file or size makes a
    new cache; the arrays are exactly what decoding gives, so results match.

    Under torchrun the first process of each machine (LOCAL_RANK 0) builds it, decoding in worker
    processes, while the others wait at a barrier of the process group: a builder that dies ends the run
    there (one line each, as any lost process does), and --dist-timeout bounds the wait."""
    stats = [(str(p), os.path.getsize(p), os.path.getmtime(p)) if p else None
             for _, image, label, _ in dataset.items for p in (image, label)]
    # skip_bad too: with it, a broken file's slot holds a stand-in, which a strict run must not reuse
    key = hashlib.sha256(json.dumps([dataset.size, dataset.skip_bad, [it[3] for it in dataset.items],
                                     stats]).encode())
    folder, (w, h) = Path(folder), dataset.size
    stem = f"{type(dataset).__name__.lower()}_{key.hexdigest()[:16]}_{w}x{h}"
    files = (folder / f"{stem}.images.npy", folder / f"{stem}.labels.npy")
    if not all(f.exists() for f in files) and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        build(dataset, files)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    for f, shape in zip(files, ((len(dataset), h, w, 3), (len(dataset), h, w))):
        try:
            found = np.load(f, mmap_mode="r").shape
        except (OSError, ValueError) as e:
            found = f"unreadable ({e})"
        if found != shape:
            raise UserError(f"{f}: holds {found}, not the {shape} this dataset needs; delete it and run again")
    return files


def build(dataset, files):
    folder = files[0].parent
    # the host in the names: machines sharing the folder may each build it (the last rename wins, same bytes)
    prefix = f".tmp-{socket.gethostname()}-"
    tmp = [f.with_name(f"{prefix}{os.getpid()}-{f.name}") for f in files]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{prefix}*-{files[0].name.split('.')[0]}.*"):  # left by a build that was killed
            pid = old.name[len(prefix):].split("-", 1)[0]  # (SIGKILL, or torchrun ending every process)
            if pid.isdigit() and not process_alive(int(pid)):
                old.unlink()
        w, h = dataset.size
        images = np.lib.format.open_memmap(tmp[0], "w+", np.uint8, (len(dataset), h, w, 3))
        labels = np.lib.format.open_memmap(tmp[1], "w+", np.uint8, (len(dataset), h, w))
        print(f"caching {len(dataset)} images in {folder} (once)", file=sys.stderr, flush=True)
        # the other processes of this machine only wait meanwhile: all its CPUs (at most 8) decode
        rows = torch.utils.data.DataLoader(_Decoded(dataset), batch_size=None, num_workers=min(8, available_cpus()))
        if sys.stderr.isatty():
            from tqdm import tqdm
            rows = tqdm(rows, total=len(dataset), desc=f"caching {len(dataset)} images", leave=False)
        for i, (image, label) in enumerate(rows):  # in order, decoded in parallel
            images[i], labels[i] = image.numpy(), label.numpy()
        images.flush(), labels.flush()
        del images, labels
        for t, f in zip(tmp, files):  # another run building the same cache at once: the last rename wins,
            os.replace(t, f)  # the same bytes
    except OSError as e:
        raise UserError(f"{folder}: cannot write the cache there ({e.strerror or e}); free space, choose "
                        "another --cache-dir, or run without --cache") from None
    finally:  # an interrupted build must not leave gigabytes of half-written arrays behind
        for t in tmp:
            if t.exists():
                t.unlink()


class _Decoded(torch.utils.data.Dataset):
    """A dataset's decoded, resized arrays by index: what a cache build reads through a DataLoader's workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset.read(index)
