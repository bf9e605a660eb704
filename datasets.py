"""GTA-V and Cityscapes loaders, the two split schemes, and the built-in synthetic pair.

    python datasets.py make-toy data/toy            # write data/toy/gta5 and data/toy/cityscapes
    python datasets.py check --toy                  # what a tree holds, split by split
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from utils import ArgumentParser, UserError, parse_size, run_main

NUM_CLASSES = 19
IGNORE = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = (480, 256)
TOY_ROOT = "data/toy"
SPLITS = ("train", "val", "test")

_train_labels = sorted((l for l in CS_LABELS if 0 <= l.trainId < NUM_CLASSES), key=lambda l: l.trainId)
CLASS_NAMES = [l.name for l in _train_labels]
PALETTE = np.array([l.color for l in _train_labels], np.uint8)  # trainId -> RGB
TRAINID_TO_ID = np.array([l.id for l in _train_labels], np.uint8)
ID_TO_TRAINID = np.full(256, IGNORE, np.uint8)  # ids the table ignores (void classes) become 255
MAX_ID = max(l.id for l in CS_LABELS)  # 33: a larger value means the file is not a label-id PNG
for _l in CS_LABELS:
    if 0 <= _l.id < 256 and 0 <= _l.trainId < NUM_CLASSES:
        ID_TO_TRAINID[_l.id] = _l.trainId


# ----------------------------------------------------------------------------- reading files

def open_png(path):
    try:
        im = Image.open(path)
        im.load()  # decode now, so a truncated file fails here and not inside a DataLoader worker
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: unreadable image ({e}); re-extract the dataset or remove this file") from None
    return im


def read_label(path, size, train_ids=False):
    """Label PNG -> uint8 H×W of trainIds at `size` (None: as stored). Palette or grey PNGs of ids (or trainIds)."""
    im = open_png(path)
    if im.mode not in ("P", "L", "I", "I;16"):
        raise UserError(f"{path}: label PNG has mode {im.mode}; expected label ids as a palette or 8-bit grey PNG "
                        "(colour-coded labels cannot be read as ids)")
    stored = np.asarray(im)
    bad = stored[(stored >= NUM_CLASSES) & (stored != IGNORE)] if train_ids else stored[stored > MAX_ID]
    if bad.size:
        kind = "trainIds (0..18, 255)" if train_ids else f"Cityscapes label ids (0..{MAX_ID})"
        raise UserError(f"{path}: holds values {sorted(set(bad.tolist()))[:5]} that are not {kind}; is it an "
                        "instance or colour PNG? Use the dataset's label-id PNGs")
    if im.mode in ("I", "I;16"):
        im = Image.fromarray(stored.astype(np.uint8))
    if size is not None and im.size != tuple(size):
        im = im.resize(size, Image.NEAREST)  # nearest keeps every value a valid id
    ids = np.array(im, dtype=np.uint8)
    if train_ids:
        return np.where(ids < NUM_CLASSES, ids, IGNORE).astype(np.uint8)
    return ID_TO_TRAINID[ids]


def read_image(path, size):
    im = open_png(path).convert("RGB")
    if im.size != tuple(size):
        im = im.resize(size, Image.BILINEAR)  # Pillow's bilinear widens its support when shrinking: antialiased
    return np.array(im, dtype=np.uint8)


def to_tensors(image, label):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    return (x - mean) / std, torch.from_numpy(np.ascontiguousarray(label)).long()


# ----------------------------------------------------------------------------- splits

def seeded_split(keys, split, seed=0, fractions=(0.6, 0.1)):
    """The report's 60/10/30 split: order by a hash of (seed, key), so it is the same on every machine."""
    order = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}/{k}".encode()).hexdigest())
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return parts[split]


def take_limit(keys, limit, seed=0):
    """A fixed subset of `limit` keys (the report trained on 12,500 GTA-V images)."""
    if limit is None or limit >= len(keys):
        return list(keys)
    return sorted(keys, key=lambda k: hashlib.sha256(f"limit/{seed}/{k}".encode()).hexdigest())[:limit]


def read_mat_vectors(path):
    """The numeric arrays of a MATLAB v5 .mat file (GTA-V's split.mat), without scipy."""
    data = Path(path).read_bytes()
    if len(data) < 128 or not data[:10].startswith(b"MATLAB 5.0"):
        raise UserError(f"{path}: not a MATLAB v5 .mat file; use the split.mat that ships with GTA-V")
    dtypes = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}

    def elements(buf):
        pos = 0
        while pos + 8 <= len(buf):
            typ, size = struct.unpack_from("<II", buf, pos)
            if typ >> 16:  # small element: size and type packed in the first 4 bytes
                yield typ & 0xFFFF, buf[pos + 4:pos + 4 + (typ >> 16)]
                pos += 8
            else:
                yield typ, buf[pos + 8:pos + 8 + size]
                pos += 8 + size + (0 if typ == 15 else -size % 8)  # compressed elements are not padded

    out = {}

    def walk(buf):
        for typ, body in elements(buf):
            if typ == 15:  # miCOMPRESSED
                walk(zlib.decompress(body))
            elif typ == 14:  # miMATRIX: flags, dims, name, real part
                parts = list(elements(body))
                if len(parts) >= 4 and parts[3][0] in dtypes:
                    name = parts[2][1].decode("ascii", "replace")
                    out[name] = np.frombuffer(parts[3][1], dtypes[parts[3][0]]).ravel()

    try:
        walk(data[128:])
    except (zlib.error, struct.error, ValueError) as e:
        raise UserError(f"{path}: damaged .mat file ({e})") from None
    return out


def write_mat_vectors(path, arrays):
    """Write column vectors of doubles as an uncompressed MATLAB v5 file (as GTA-V's split.mat holds)."""
    def element(typ, payload):
        return struct.pack("<II", typ, len(payload)) + payload + b"\0" * (-len(payload) % 8)

    body = b""
    for name, values in arrays.items():
        values = np.asarray(values, "<f8")
        matrix = (element(6, struct.pack("<II", 6, 0))  # array flags: mxDOUBLE_CLASS
                  + element(5, struct.pack("<ii", len(values), 1))
                  + element(1, name.encode("ascii"))
                  + element(9, values.tobytes()))
        body += element(14, matrix)
    header = b"MATLAB 5.0 MAT-file, written by datasets.py".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    Path(path).write_bytes(header + body)


# ----------------------------------------------------------------------------- datasets

class SegDataset(torch.utils.data.Dataset):
    """(image, label): image 3×H×W float, ImageNet-normalised; label H×W long, trainIds 0..18 and 255.

    items: (name, image_path, label_path or None, label_holds_train_ids). Without a label path the label
    is all 255, which is how target images reach phase 2 without their labels. full_res_labels keeps each
    label at its stored size (evaluation at full resolution).
    """

    def __init__(self, items, size=DEFAULT_SIZE, hflip=False, skip_bad=False):
        self.items, self.size, self.hflip, self.skip_bad = list(items), tuple(size), hflip, skip_bad
        self.flip_seed = 0  # set per epoch by training: flips depend on (seed, epoch, index) only
        self.full_res_labels = False
        self.cache_files, self._cache = None, None

    def __len__(self):
        return len(self.items)

    def __getstate__(self):  # DataLoader workers reopen the memmaps instead of receiving copies of them
        return {**self.__dict__, "_cache": None}

    def use_cache(self, folder):
        """Decode and resize every image and label once into two uint8 memmaps under folder, read those
        afterwards. The file name hashes the size and each file's path, length and mtime, so a changed file
        list, file or size makes a new cache; the arrays are exactly what decoding gives, so results match."""
        stats = [(str(p), os.path.getsize(p), os.path.getmtime(p)) if p else None
                 for _, image, label, _ in self.items for p in (image, label)]
        # skip_bad too: with it, a broken file's slot holds a stand-in, which a strict run must not reuse
        key = hashlib.sha256(json.dumps([self.size, self.skip_bad, [it[3] for it in self.items], stats]).encode())
        key = key.hexdigest()[:16]
        folder = Path(folder)
        w, h = self.size
        files = (folder / f"{key}_{w}x{h}.images.npy", folder / f"{key}_{w}x{h}.labels.npy")
        if not all(f.exists() for f in files):
            tmp = [f.with_name(f".tmp-{os.getpid()}-{f.name}") for f in files]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                images = np.lib.format.open_memmap(tmp[0], "w+", np.uint8, (len(self), h, w, 3))
                labels = np.lib.format.open_memmap(tmp[1], "w+", np.uint8, (len(self), h, w))
                steps = range(len(self))
                if sys.stderr.isatty():
                    from tqdm import tqdm
                    steps = tqdm(steps, desc=f"caching {len(self)} images in {folder}", leave=False)
                for i in steps:
                    images[i], labels[i] = self.read(i)
                images.flush(), labels.flush()
                del images, labels
                for t, f in zip(tmp, files):
                    os.replace(t, f)
            except OSError as e:
                raise UserError(f"{folder}: cannot write the cache there ({e.strerror or e}); free space, or "
                                "run without --cache") from None
            finally:  # an interrupted build must not leave gigabytes of half-written arrays behind
                for t in tmp:
                    if t.exists():
                        t.unlink()
        self.cache_files = files
        return self

    def load(self, index):
        """uint8 arrays at the target size, before flipping and normalisation."""
        if self.cache_files is not None and not self.full_res_labels:
            if self._cache is None:
                self._cache = [np.load(f, mmap_mode="r") for f in self.cache_files]
            return np.array(self._cache[0][index]), np.array(self._cache[1][index])
        _, image_path, label_path, train_ids = self.items[index]
        image = read_image(image_path, self.size)
        if label_path is None:
            label = np.full(image.shape[:2], IGNORE, np.uint8)
        else:
            label = read_label(label_path, None if self.full_res_labels else self.size, train_ids)
        return image, label

    def read(self, index):
        """load(), or with skip_bad the next readable image in place of a broken one."""
        for attempt in range(len(self)):
            try:
                return self.load((index + attempt) % len(self))
            except UserError as e:
                if not self.skip_bad:
                    raise
                print(f"warning: skipped {e}", file=sys.stderr)
        raise UserError(f"no image of {len(self)} could be read (see the warnings above)")

    def __getitem__(self, index):
        image, label = self.read(index)
        if self.hflip and random.Random(f"{self.flip_seed}/{index}").random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return to_tensors(image, label)


def _require_dir(path, what):
    if not Path(path).is_dir():
        raise UserError(f"{path}: {what} not found; pass the right root (or --toy for the built-in data)")


def gta5_pairs(root):
    """{name: (image, label)} of ROOT/images/*.png with ROOT/labels/*.png; unpaired files listed apart."""
    root = Path(root)
    _require_dir(root / "images", "GTA-V images folder")
    _require_dir(root / "labels", "GTA-V labels folder")
    images = {p.name: p for p in (root / "images").glob("*.png")}
    labels = {p.name: p for p in (root / "labels").glob("*.png")}
    pairs = {n: (images[n], labels[n]) for n in sorted(images.keys() & labels.keys())}
    unpaired = sorted([images[n] for n in images.keys() - labels.keys()] + [labels[n] for n in labels.keys() - images.keys()])
    return pairs, unpaired


def cityscapes_pairs(root, folder):
    """{name: (image, label or None, label_holds_train_ids)} for leftImg8bit/FOLDER; unpaired labels apart."""
    root = Path(root)
    _require_dir(root / "leftImg8bit", "Cityscapes leftImg8bit folder")
    out = {}
    for image in sorted((root / "leftImg8bit" / folder).glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / folder / image.parent.name
        ids, train_ids = gt / f"{stem}_gtFine_labelIds.png", gt / f"{stem}_gtFine_labelTrainIds.png"
        label = ids if ids.exists() else train_ids if train_ids.exists() else None
        out[stem] = (image, label, label == train_ids)
    unpaired = sorted(p for p in (root / "gtFine" / folder).glob("*/*_gtFine_label*Ids.png")
                      if p.name.split("_gtFine_")[0] not in out)
    return out, unpaired


def bad_files(paths, problem, skip):
    """Stop on the first, or with skip (--skip-bad) list them as a warning and go on without them."""
    if not skip:
        raise UserError(f"{paths[0]}: {problem} ({len(paths)} such files); restore or remove them, "
                        "or pass --skip-bad to leave them out")
    shown = "\n  ".join(str(p) for p in paths[:20])
    more = f"\n  ... and {len(paths) - 20} more" if len(paths) > 20 else ""
    print(f"warning: leaving out {len(paths)} files that {problem.replace('has', 'have')}:\n  {shown}{more}",
          file=sys.stderr)


def _check_split_args(split, scheme):
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if scheme not in ("seed", "official"):
        raise UserError(f"split scheme {scheme!r}: expected 'seed' or 'official'")


class GTA5(SegDataset):
    """GTA-V ("Playing for Data"): ROOT/images/00001.png, ROOT/labels/00001.png (Cityscapes ids).

    scheme 'seed': the report's seeded 60/10/30 split; 'official': ROOT/split.mat (trainIds/valIds/testIds).
    """

    def __init__(self, root, split="train", size=DEFAULT_SIZE, scheme="seed", limit=None, hflip=False, seed=0,
                 skip_bad=False, cache=False):
        _check_split_args(split, scheme)
        pairs, unpaired = gta5_pairs(root)
        if not pairs:
            raise UserError(f"{root}: no image/label pairs (PNG files of the same name in images/ and labels/)")
        if unpaired:
            bad_files(unpaired, "has no partner in images/ or labels/", skip_bad)
        if scheme == "seed":
            names = seeded_split(list(pairs), split, seed)
        else:
            mat = Path(root) / "split.mat"
            if not mat.exists():
                raise UserError(f"{mat}: not found; the official split needs GTA-V's split.mat there "
                                "(or use --split-scheme seed)")
            vectors = read_mat_vectors(mat)
            key = f"{split}Ids"
            if key not in vectors:
                raise UserError(f"{mat}: has no variable {key!r} (found {', '.join(vectors) or 'none'})")
            wanted = {f"{int(i):05d}.png" for i in vectors[key]}
            names = [n for n in pairs if n in wanted]
        if split == "train":
            names = take_limit(names, limit, seed)
        if not names:
            raise UserError(f"{root}: the {scheme} {split} split of GTA-V is empty")
        items = [(n, *pairs[n], False) for n in sorted(names)]
        super().__init__(items, size, hflip, skip_bad)
        if cache:
            self.use_cache(Path(root) / ".cache")


class Cityscapes(SegDataset):
    """Cityscapes: ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png with ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png.

    scheme 'official': the train/val/test folders (test labels are not public). 'seed': the seeded 60/10/30
    split of the labelled train+val images. labels=False drops labels (all 255): phase 2's target images.
    """

    def __init__(self, root, split="train", size=DEFAULT_SIZE, scheme="seed", limit=None, hflip=False,
                 seed=0, labels=True, skip_bad=False, cache=False):
        _check_split_args(split, scheme)
        if scheme == "official":
            if labels and split == "test":  # the release ships test label files, but they hold only void ids
                raise UserError(f"{Path(root) / 'gtFine' / 'test'}: Cityscapes test labels are not public (the "
                                "files there are void); evaluate on val instead")
            found, _ = cityscapes_pairs(root, split)
        else:
            found = {}
            for folder in ("train", "val"):
                found.update(cityscapes_pairs(root, folder)[0])
            missing = [v[0] for v in found.values() if v[1] is None]
            if missing and labels:
                bad_files(missing, "has no *_gtFine_labelIds.png in gtFine/", skip_bad)
            found = {k: v for k, v in found.items() if v[1] is not None}  # the pool: labelled train + val images
            found = {k: found[k] for k in seeded_split(list(found), split, seed)}
        if labels:
            missing = [v[0] for v in found.values() if v[1] is None]
            if missing:
                bad_files(missing, "has no *_gtFine_labelIds.png in gtFine/", skip_bad)
                found = {k: v for k, v in found.items() if v[1] is not None}
        names = take_limit(sorted(found), limit, seed) if split == "train" else sorted(found)
        if not names:
            raise UserError(f"{Path(root) / 'leftImg8bit' / split}: the {scheme} {split} split of Cityscapes is empty")
        items = [(n, found[n][0], found[n][1] if labels else None, found[n][2]) for n in names]
        super().__init__(items, size, hflip, skip_bad)
        if cache:
            self.use_cache(Path(root) / ".cache")


# ----------------------------------------------------------------------------- the built-in synthetic pair
# Street scenes drawn twice from one layout: a source that looks like a game (flat colours, sharp edges,
# GTA-V's 1914:1052 aspect) and a target that looks like a camera (other colours, textures, blur, sensor
# noise, lighting, an ego-vehicle hood, 2:1 aspect, more people and bicycles, fewer buses and trains).

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BIKE = 24, 25, 26, 27, 28, 31, 32, 33
EGO, STATIC, GROUND, PARKING, RAIL, GUARD = 1, 4, 6, 9, 10, 14

SOURCE_STYLE = {
    "colours": {ROAD: (88, 86, 96), SIDEWALK: (176, 160, 146), BUILDING: (160, 112, 86), WALL: (196, 180, 136),
                FENCE: (128, 96, 64), POLE: (58, 58, 64), LIGHT: (36, 36, 30), SIGN: (236, 196, 40),
                VEG: (52, 150, 46), TERRAIN: (150, 176, 72), SKY: (96, 164, 236), PERSON: (204, 64, 60),
                RIDER: (64, 70, 200), CAR: (200, 40, 40), TRUCK: (214, 214, 206), BUS: (236, 176, 28),
                TRAIN: (190, 48, 56), MOTO: (40, 40, 48), BIKE: (24, 90, 170), STATIC: (126, 92, 58),
                GROUND: (134, 120, 96), PARKING: (110, 96, 110), RAIL: (112, 90, 76), GUARD: (186, 186, 190)},
    "jitter": 12, "cars": (1, 4), "persons": (1, 4), "poles": (2, 5), "trees": (1, 3),
    "p": {"truck": 0.5, "bus": 0.45, "train": 0.3, "bike": 0.45, "moto": 0.45, "fence": 0.5, "wall": 0.5},
}
TARGET_STYLE = {
    "colours": {ROAD: (70, 72, 74), SIDEWALK: (128, 124, 120), BUILDING: (118, 116, 112), WALL: (150, 146, 132),
                FENCE: (96, 100, 92), POLE: (96, 98, 102), LIGHT: (24, 26, 30), SIGN: (186, 172, 90),
                VEG: (78, 100, 52), TERRAIN: (112, 124, 80), SKY: (196, 206, 218), PERSON: (72, 60, 66),
                RIDER: (60, 66, 80), CAR: (110, 112, 120), TRUCK: (160, 158, 150), BUS: (170, 140, 70),
                TRAIN: (150, 150, 160), MOTO: (30, 30, 34), BIKE: (44, 44, 50), STATIC: (90, 80, 70),
                GROUND: (100, 96, 90), PARKING: (84, 80, 88), RAIL: (92, 84, 78), GUARD: (150, 152, 156)},
    "jitter": 28, "cars": (2, 6), "persons": (2, 6), "poles": (3, 6), "trees": (2, 5),
    "p": {"truck": 0.3, "bus": 0.2, "train": 0.15, "bike": 0.65, "moto": 0.25, "fence": 0.4, "wall": 0.3},
}
TOY_CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau"), "test": ("berlin",)}
TOY_SOURCE_SIZE = (640, 352)
TOY_TARGET_SIZE = (512, 256)


def draw_scene(rng, size, style):
    """One street scene: (RGB uint8 H×W×3, Cityscapes label ids uint8 H×W), drawn flat."""
    w, h = size
    rgb, lab = Image.new("RGB", size), Image.new("L", size)
    dr, dl = ImageDraw.Draw(rgb), ImageDraw.Draw(lab)

    def colour(cid, base=None):
        c = np.array(base or style["colours"][cid]) + rng.integers(-style["jitter"], style["jitter"] + 1)
        return tuple(int(v) for v in np.clip(c, 0, 255))

    def paint(kind, xy, cid, col=None, **kw):
        getattr(dr, kind)(xy, fill=col or colour(cid), **kw)
        getattr(dl, kind)(xy, fill=cid, **kw)

    hz = h * rng.uniform(0.36, 0.5)  # horizon
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point
    cx, rb = w * rng.uniform(0.4, 0.6), w * rng.uniform(0.28, 0.42)  # road centre and half width at the bottom
    sw = w * rng.uniform(0.1, 0.22)
    lerp = lambda a, b, y: a + (b - a) * (y - hz) / (h - hz)
    road_l = lambda y: lerp(vx - w * 0.015, cx - rb, y)
    road_r = lambda y: lerp(vx + w * 0.015, cx + rb, y)
    out_l = lambda y: lerp(vx - w * 0.03, cx - rb - sw, y)
    out_r = lambda y: lerp(vx + w * 0.03, cx + rb + sw, y)
    depth = lambda y: max(0.03, (y - hz) / (h - hz))  # apparent size of an object standing at row y

    paint("rectangle", (0, 0, w, h), SKY)
    for step in (1, -1):  # buildings from each image border towards the vanishing point, shrinking
        x = 0.0 if step > 0 else float(w)
        while (vx - x) * step > w * 0.04:
            bw = w * rng.uniform(0.06, 0.18)
            x2 = x + step * bw
            near = abs(x - vx) / max(vx, w - vx)
            top = hz - h * (0.08 + rng.uniform(0.1, 0.45) * near)
            if rng.random() < 0.15:
                paint("ellipse", (min(x, x2), top, max(x, x2), hz + h * 0.08), VEG)
            else:
                paint("rectangle", (min(x, x2), top, max(x, x2), hz + h * 0.05), BUILDING)
                win = colour(BUILDING, tuple(int(v * 0.6) for v in style["colours"][BUILDING]))
                for wy in np.arange(top + h * 0.03, hz - h * 0.02, h * 0.06 * (0.4 + near)):
                    for wx in np.arange(min(x, x2) + bw * 0.1, max(x, x2) - bw * 0.15, bw * 0.25):
                        paint("rectangle", (wx, wy, wx + bw * 0.12, wy + h * 0.025 * (0.4 + near)), BUILDING, win)
            x = x2

    paint("rectangle", (0, hz, w, h), TERRAIN if rng.random() < 0.75 else GROUND)
    paint("polygon", [(out_l(hz), hz), (road_l(hz), hz), (road_l(h), h), (out_l(h), h)], SIDEWALK)
    paint("polygon", [(road_r(hz), hz), (out_r(hz), hz), (out_r(h), h), (road_r(h), h)], SIDEWALK)
    paint("polygon", [(road_l(hz), hz), (road_r(hz), hz), (road_r(h), h), (road_l(h), h)], ROAD)
    for y in np.arange(hz + (h - hz) * 0.1, h, (h - hz) * 0.18):  # lane marks, still road
        y2 = y + (h - hz) * 0.07
        mid = lambda yy: (road_l(yy) + road_r(yy)) / 2
        paint("polygon", [(mid(y) - w * 0.004 * depth(y), y), (mid(y) + w * 0.004 * depth(y), y),
                          (mid(y2) + w * 0.006 * depth(y2), y2), (mid(y2) - w * 0.006 * depth(y2), y2)],
              ROAD, (225, 225, 215))
    if rng.random() < 0.3:  # a parking bay or a guard rail: void classes the model must learn to ignore
        y = hz + (h - hz) * rng.uniform(0.4, 0.8)
        paint("polygon", [(road_l(y), y), (road_l(y) + w * 0.08 * depth(y), y),
                          (road_l(y + h * 0.08) + w * 0.1, y + h * 0.08), (road_l(y + h * 0.08), y + h * 0.08)], PARKING)
    if rng.random() < 0.3:
        paint("line", [(road_r(hz + 2), hz + 2 - h * 0.01), (road_r(h), h - h * 0.06)], GUARD, width=max(2, h // 60))

    objects = []  # (row where it stands, how to draw it): far objects are drawn first
    for side, edge in ((-1, out_l), (1, out_r)):
        if rng.random() < style["p"]["fence"]:
            y0, y1 = sorted(hz + (h - hz) * rng.uniform(0.05, 1.0, 2))
            objects.append((y0, lambda y0=y0, y1=y1, edge=edge: fence(y0, y1, edge)))
        if rng.random() < style["p"]["wall"]:
            y0, y1 = sorted(hz + (h - hz) * rng.uniform(0.05, 0.9, 2))
            objects.append((y0, lambda y0=y0, y1=y1, edge=edge, side=side: paint("polygon", [
                (edge(y0) + side * w * 0.01, y0), (edge(y1) + side * w * 0.01, y1),
                (edge(y1) + side * w * 0.01, y1 - h * 0.2 * depth(y1)), (edge(y0) + side * w * 0.01, y0 - h * 0.2 * depth(y0))],
                WALL)))

    def fence(y0, y1, edge):
        tops = []
        for y in np.linspace(y0, y1, 6):
            top = y - h * 0.12 * depth(y)
            paint("line", [(edge(y), y), (edge(y), top)], FENCE, width=max(1, int(w * 0.006 * depth(y))))
            tops.append((edge(y), y, top))
        for a, b in zip(tops, tops[1:]):
            for frac in (0.0, 0.5):
                paint("line", [(a[0], a[2] + (a[1] - a[2]) * frac), (b[0], b[2] + (b[1] - b[2]) * frac)], FENCE,
                      width=max(1, int(w * 0.004 * depth(b[1]))))

    def ground_row(lo=0.08, hi=1.0):
        return hz + (h - hz) * rng.uniform(lo, hi)

    def pole(y, x):
        d = depth(y)
        top = y - h * 0.6 * d
        paint("rectangle", (x - w * 0.004 * d - 0.5, top, x + w * 0.004 * d + 0.5, y), POLE)
        kind = rng.random()
        if kind < 0.45:
            bw, bh = w * 0.016 * d + 1, h * 0.09 * d + 2
            paint("rectangle", (x - bw, top - bh, x + bw, top), LIGHT)
            for i, lamp in enumerate(((220, 40, 30), (230, 170, 20), (40, 200, 80))):
                r = bw * 0.6
                ly = top - bh + bh * (i + 0.5) / 3
                if rng.random() < 0.5:
                    paint("ellipse", (x - r, ly - r, x + r, ly + r), LIGHT, lamp)
        elif kind < 0.9:
            r = w * 0.02 * d + 1.5
            shape = rng.integers(3)
            if shape == 0:
                paint("ellipse", (x - r, top - 2 * r, x + r, top), SIGN)
            elif shape == 1:
                paint("polygon", [(x - r, top), (x + r, top), (x, top - 2 * r)], SIGN)
            else:
                paint("rectangle", (x - r, top - 1.5 * r, x + r, top), SIGN)

    def tree(y, x):
        d = depth(y)
        paint("rectangle", (x - w * 0.006 * d, y - h * 0.3 * d, x + w * 0.006 * d, y), VEG)
        for _ in range(3):
            rx, ry = w * rng.uniform(0.04, 0.08) * d, h * rng.uniform(0.1, 0.18) * d
            ox, oy = rng.uniform(-rx, rx) * 0.6, h * 0.3 * d + rng.uniform(0, ry)
            paint("ellipse", (x + ox - rx, y - oy - ry, x + ox + rx, y - oy + ry), VEG)

    def person(y, x, cid=PERSON, lift=0.0):
        d = depth(y)
        ph = h * 0.32 * d
        base = y - lift * ph
        head = ph * 0.13
        body = colour(cid, tuple(int(v) for v in rng.integers(30, 230, 3))) if style is SOURCE_STYLE else None
        paint("rectangle", (x - ph * 0.12, base - ph * 0.82, x + ph * 0.12, base - ph * 0.42), cid, body)
        if lift == 0:
            paint("line", [(x - ph * 0.06, base - ph * 0.43), (x - ph * 0.1, base)], cid, width=max(1, int(ph * 0.07)))
            paint("line", [(x + ph * 0.06, base - ph * 0.43), (x + ph * 0.1, base)], cid, width=max(1, int(ph * 0.07)))
        paint("ellipse", (x - head, base - ph * 0.82 - 2 * head, x + head, base - ph * 0.82), cid,
              colour(cid, (214, 170, 140)))

    def two_wheeler(y, x, cid, ridden):
        d = depth(y)
        r = h * 0.06 * d + 1
        lw = max(1, int(r * 0.3))
        for wx in (x - 1.8 * r, x + 1.8 * r):
            paint("ellipse", (wx - r, y - 2 * r, wx + r, y), cid, width=lw) if cid == BIKE else \
                paint("ellipse", (wx - r, y - 2 * r, wx + r, y), cid)
        paint("line", [(x - 1.8 * r, y - r), (x, y - 2.2 * r), (x + 1.8 * r, y - r), (x - 1.8 * r, y - r)], cid, width=lw)
        if cid == MOTO:
            paint("rectangle", (x - 1.2 * r, y - 2.6 * r, x + 1.2 * r, y - 1.2 * r), cid)
        if ridden:
            person(y - 1.8 * r, x, RIDER, lift=0.0001)

    def vehicle(y, x, cid):
        d = depth(y)
        length, height = {CAR: (0.22, 0.11), TRUCK: (0.3, 0.24), BUS: (0.42, 0.26), TRAIN: (1.2, 0.28)}[cid]
        vw, vh = w * length * d, h * height * d
        col = colour(cid, tuple(int(v) for v in rng.integers(20, 235, 3))) if cid == CAR and style is SOURCE_STYLE \
            else colour(cid)
        if cid == CAR:
            paint("rectangle", (x - vw / 2, y - vh * 0.6, x + vw / 2, y - vh * 0.1), cid, col)
            paint("polygon", [(x - vw * 0.3, y - vh * 0.6), (x + vw * 0.3, y - vh * 0.6), (x + vw * 0.2, y - vh),
                              (x - vw * 0.2, y - vh)], cid, col)
            for wx in (x - vw * 0.3, x + vw * 0.3):
                paint("ellipse", (wx - vh * 0.18, y - vh * 0.36, wx + vh * 0.18, y), cid, (20, 20, 20))
        else:
            if cid == TRAIN:
                paint("rectangle", (0, y - h * 0.01 * d, w, y + h * 0.02 * d), RAIL)
            paint("rectangle", (x - vw / 2, y - vh, x + vw / 2, y), cid, col)
            dark = tuple(int(v * 0.45) for v in col)
            for wx in np.arange(x - vw * 0.45, x + vw * 0.4, vw * (0.12 if cid != TRUCK else 0.9)):
                paint("rectangle", (wx, y - vh * 0.85, wx + vw * 0.08, y - vh * 0.55), cid, dark)

    p = style["p"]
    for _ in range(rng.integers(*style["poles"], endpoint=True)):
        y = ground_row(0.1)
        x = (out_l(y) + road_l(y)) / 2 if rng.random() < 0.5 else (out_r(y) + road_r(y)) / 2
        objects.append((y, lambda y=y, x=x: pole(y, x)))
    for _ in range(rng.integers(*style["trees"], endpoint=True)):
        y = ground_row(0.05)
        x = out_l(y) - w * rng.uniform(0.0, 0.1) if rng.random() < 0.5 else out_r(y) + w * rng.uniform(0.0, 0.1)
        objects.append((y, lambda y=y, x=x: tree(y, x)))
    for _ in range(rng.integers(*style["persons"], endpoint=True)):
        y = ground_row()
        x = rng.uniform(out_l(y), road_l(y)) if rng.random() < 0.5 else rng.uniform(road_r(y), out_r(y))
        objects.append((y, lambda y=y, x=x: person(y, x)))
    on_road = lambda y: rng.uniform(road_l(y) * 0.8 + road_r(y) * 0.2, road_l(y) * 0.2 + road_r(y) * 0.8)
    for _ in range(rng.integers(*style["cars"], endpoint=True)):
        y = ground_row(0.1)
        objects.append((y, lambda y=y, x=on_road(y): vehicle(y, x, CAR)))
    for cid, key in ((TRUCK, "truck"), (BUS, "bus")):
        if rng.random() < p[key]:
            y = ground_row(0.1, 0.7)
            objects.append((y, lambda y=y, x=on_road(y), cid=cid: vehicle(y, x, cid)))
    if rng.random() < p["train"]:
        y = ground_row(0.15, 0.45)
        objects.append((y, lambda y=y: vehicle(y, rng.uniform(0, w), TRAIN)))
    for cid, key in ((BIKE, "bike"), (MOTO, "moto")):
        if rng.random() < p[key]:
            y = ground_row(0.2)
            ridden = rng.random() < 0.7
            x = on_road(y) if ridden else rng.uniform(out_l(y), road_l(y))
            objects.append((y, lambda y=y, x=x, cid=cid, ridden=ridden: two_wheeler(y, x, cid, ridden)))
    if rng.random() < 0.5:  # a bin or a crate on the pavement: 'static', ignored in training
        y = ground_row(0.2)
        x, d = rng.uniform(road_r(y), out_r(y)), depth(y)
        objects.append((y, lambda y=y, x=x, d=d: paint("rectangle", (x, y - h * 0.06 * d, x + w * 0.03 * d, y), STATIC)))
    for _, draw in sorted(objects, key=lambda o: o[0]):
        draw()
    if style is TARGET_STYLE:  # the camera car's own hood, as in every Cityscapes frame
        paint("chord", (w * 0.05, h * rng.uniform(0.88, 0.93), w * 0.95, h * 1.25), EGO, (22, 22, 26), start=180, end=360)
    return np.asarray(rgb), np.asarray(lab)


def camera_look(rng, rgb, lab):
    """Textures per class, lighting, blur and sensor noise: what separates the target from the game look."""
    h, w = lab.shape
    img = rgb.astype(np.float32)
    texture = np.zeros(256, np.float32)
    texture[[ROAD, SIDEWALK, BUILDING, WALL, VEG, TERRAIN]] = (0.12, 0.15, 0.18, 0.12, 0.35, 0.3)
    small = rng.normal(size=(max(2, h // 12), max(2, w // 12))).astype(np.float32)
    low = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    fine = rng.normal(size=(h, w)).astype(np.float32)
    img *= (1 + texture[lab] * (0.6 * low + 0.4 * fine))[..., None]
    gain = rng.uniform(0.65, 1.25) * (1 + rng.uniform(-0.08, 0.08, 3))  # exposure and white balance
    rows = 1 + rng.uniform(-0.25, 0.25) * np.linspace(-1, 1, h)[:, None, None]  # light falling across the frame
    img = img * gain * rows
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.4)))
    img = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(3, 8), (h, w, 1)) + rng.normal(0, 2, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _label_png(ids, palette):
    im = Image.fromarray(ids, "L")
    if palette:  # GTA-V ships palette PNGs whose indices are the ids
        im = im.convert("P")
        colours = np.zeros((256, 3), np.uint8)
        for l in CS_LABELS:
            if 0 <= l.id < 256:
                colours[l.id] = l.color
        im.putpalette(colours.ravel().tolist())
    return im


def make_toy(root, num_source=200, num_target=200, seed=0, source_size=TOY_SOURCE_SIZE,
             target_size=TOY_TARGET_SIZE, progress=False):
    """Write ROOT/gta5 and ROOT/cityscapes in the real layouts; same seed, same bytes."""
    root = Path(root)
    for sub in ("gta5", "cityscapes"):
        if (root / sub).exists():
            raise UserError(f"{root / sub}: already exists; remove it or choose another ROOT")
    if num_source < 10 or num_target < 10:
        raise UserError("make-toy needs at least 10 source and 10 target images (for 60/10/30 splits)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=root))
    try:
        gta = tmp / "gta5"
        (gta / "images").mkdir(parents=True)
        (gta / "labels").mkdir()
        steps = range(num_source)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="source (game look)", leave=False)
        for i in steps:
            rng = np.random.default_rng([seed, 0, i])
            rgb, ids = draw_scene(rng, source_size, SOURCE_STYLE)
            image = Image.fromarray(rgb)
            if i % 10 == 7:  # a few GTA-V frames come at another size than their labels
                image = image.resize((source_size[0] * 5 // 4, source_size[1] * 5 // 4), Image.BILINEAR)
            image.save(gta / "images" / f"{i + 1:05d}.png")
            _label_png(ids, palette=True).save(gta / "labels" / f"{i + 1:05d}.png")
        names = [f"{i + 1:05d}" for i in range(num_source)]
        official = {s: seeded_split(names, s, "official", (0.5, 0.25)) for s in SPLITS}
        write_mat_vectors(gta / "split.mat", {f"{s}Ids": sorted(int(n) for n in official[s]) for s in SPLITS})

        cs = tmp / "cityscapes"
        n_val = max(2, round(num_target * 0.25))
        n_test = max(1, round(num_target * 0.1))
        jobs = [("train", i) for i in range(num_target - n_val)] + [("val", i) for i in range(n_val)] + \
               [("test", i) for i in range(n_test)]
        if progress:
            jobs = tqdm(jobs, desc="target (camera look)", leave=False)
        for k, (split, i) in enumerate(jobs):
            rng = np.random.default_rng([seed, 1, k])
            rgb, ids = draw_scene(rng, target_size, TARGET_STYLE)
            rgb = camera_look(rng, rgb, ids)
            city = TOY_CITIES[split][i % len(TOY_CITIES[split])]
            stem = f"{city}_{i:06d}_000019"
            (cs / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(cs / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            gt = cs / "gtFine" / split / city
            gt.mkdir(parents=True, exist_ok=True)
            if split == "test":  # as in the real release: test label files exist but hold nothing but void
                ids = np.zeros_like(ids)
            _label_png(ids, palette=False).save(gt / f"{stem}_gtFine_labelIds.png")
            if split != "test":
                # one instance per class (Cityscapes' encoding for groups): enough for the official evaluation
                Image.fromarray(ids.astype(np.uint16)).save(gt / f"{stem}_gtFine_instanceIds.png")
        for sub in ("gta5", "cityscapes"):
            try:
                os.rename(tmp / sub, root / sub)
            except OSError:  # another process (a torchrun rank) made the same pair first: same seed, same bytes
                if not (root / sub).is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_toy(root=TOY_ROOT):
    """The built-in pair under ROOT, made with default sizes the first time it is asked for."""
    root = Path(root)
    if not ((root / "gta5").is_dir() and (root / "cityscapes").is_dir()):
        print(f"making the built-in synthetic pair in {root} (once) ...", file=sys.stderr)
        try:
            make_toy(root, progress=sys.stderr.isatty())
        except UserError:
            if not ((root / "gta5").is_dir() and (root / "cityscapes").is_dir()):
                raise  # a half-made pair from elsewhere; another process finishing first is fine
    return root / "gta5", root / "cityscapes"


# ----------------------------------------------------------------------------- command line

def non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, 0 or more")
    return value


def add_data_args(parser):
    """The data flags every training and evaluation script takes."""
    g = parser.add_argument_group("data")
    g.add_argument("--gta5-root", default="data/gta5", help="GTA-V root holding images/ and labels/ (default: %(default)s)")
    g.add_argument("--cityscapes-root", default="data/cityscapes",
                   help="Cityscapes root holding leftImg8bit/ and gtFine/ (default: %(default)s)")
    g.add_argument("--toy", action="store_true",
                   help=f"use the built-in synthetic pair in {TOY_ROOT} (made on first use) instead of the roots")
    g.add_argument("--split-scheme", choices=("seed", "official"), default="seed",
                   help="seed: the report's seeded 60/10/30 split of each dataset; official: GTA-V's split.mat and "
                        "Cityscapes' train/val folders (default: %(default)s)")
    g.add_argument("--workers", type=non_negative, default=2, help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--cache", action="store_true",
                   help="decode and resize the images once into uint8 memmaps under each data root's .cache/ "
                        "(rebuilt when the files or --size change), then read those: much faster epochs")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out images without labels (and the reverse) with a warning listing them; in "
                        "training, also replace an unreadable or wrongly encoded file by the next image")
    return g


def resolve_data_roots(args):
    if args.toy:
        args.gta5_root, args.cityscapes_root = (str(p) for p in ensure_toy())
    return args


def _sizes(paths):
    counts = {}
    for p in paths:
        try:
            with Image.open(p) as im:
                counts[im.size] = counts.get(im.size, 0) + 1
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{p}: unreadable image ({e}); re-extract the dataset or remove this file") from None
    return ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def _label_ids(paths, sample):
    """Sorted ids found in (an evenly spaced sample of) the label files."""
    paths = list(paths)
    if sample and len(paths) > sample:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, sample).astype(int)]
    found = np.zeros(65536, bool)
    for p in paths:
        im = open_png(p)
        found[np.unique(np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L")))] = True
    ids = np.flatnonzero(found)
    outside = [int(i) for i in ids if ID_TO_TRAINID[min(i, 255)] == IGNORE and i not in {l.id for l in CS_LABELS}]
    text = " ".join(str(i) for i in ids) + f"  ({len(paths)} files read)"
    return text + (f"; ids outside the Cityscapes table (read as 255): {outside}" if outside else "")


def check(gta5_root, cityscapes_root, sample=200):
    """Print what each tree holds; raise UserError when a loader could not use it."""
    print(f"GTA-V  {gta5_root}")
    pairs, unpaired = gta5_pairs(gta5_root)
    print(f"  image/label pairs: {len(pairs)}; files without a partner: {len(unpaired)}")
    for p in unpaired[:10]:
        print(f"    {p}")
    print(f"  image sizes: {_sizes(v[0] for v in pairs.values())}")
    print(f"  label sizes: {_sizes(v[1] for v in pairs.values())}")
    print(f"  label ids: {_label_ids((v[1] for v in pairs.values()), sample)}")
    names = list(pairs)
    print("  seed split: " + ", ".join(f"{s} {len(seeded_split(names, s))}" for s in SPLITS))
    mat = Path(gta5_root) / "split.mat"
    if mat.exists():
        vec = read_mat_vectors(mat)
        print("  official split (split.mat): " + ", ".join(
            f"{s} {len({f'{int(i):05d}.png' for i in vec.get(s + 'Ids', [])} & set(names))}" for s in SPLITS))
    else:
        print("  official split: no split.mat (only --split-scheme seed)")

    print(f"Cityscapes  {cityscapes_root}")
    labelled = []
    for folder in SPLITS:
        found, unpaired = cityscapes_pairs(cityscapes_root, folder)
        with_label = [v for v in found.values() if v[1] is not None]
        if folder != "test":
            labelled += [k for k, v in found.items() if v[1] is not None]
        note = " (test labels are not public: never used)" if folder == "test" else ""
        print(f"  {folder}: images {len(found)}, with labels {len(with_label)}, labels without an image "
              f"{len(unpaired)}, cities {len({v[0].parent.name for v in found.values()})}{note}")
        for p in unpaired[:10]:
            print(f"    {p}")
        if found:
            print(f"    image sizes: {_sizes(v[0] for v in found.values())}")
        if with_label and folder != "test":
            print(f"    label ids: {_label_ids((v[1] for v in with_label), sample)}")
    print("  seed split (labelled train+val): " + ", ".join(
        f"{s} {len(seeded_split(labelled, s))}" for s in SPLITS))
    for dataset in (lambda: GTA5(gta5_root, "train"), lambda: Cityscapes(cityscapes_root, "train")):
        dataset()  # the loaders' own checks: an unusable tree fails here with their one line
    print("both trees are usable")


def main():
    p = ArgumentParser(description="Make the built-in synthetic GTA-V/Cityscapes pair, or check a data tree.")
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-toy", help="write ROOT/gta5 and ROOT/cityscapes in the real layouts and encodings")
    mk.add_argument("root")
    mk.add_argument("--num-source", type=int, default=200, help="GTA-V-like images (default: %(default)s)")
    mk.add_argument("--num-target", type=int, default=200,
                    help="labelled Cityscapes-like images, 3/4 train and 1/4 val, plus 10%% unlabelled test "
                         "(default: %(default)s)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--source-size", type=parse_size, default=TOY_SOURCE_SIZE, metavar="WxH",
                    help="(default: %sx%s)" % TOY_SOURCE_SIZE)
    mk.add_argument("--target-size", type=parse_size, default=TOY_TARGET_SIZE, metavar="WxH",
                    help="(default: %sx%s)" % TOY_TARGET_SIZE)
    ck = sub.add_parser("check", help="count pairs, sizes and label ids per dataset and split")
    ck.add_argument("--gta5-root", default="data/gta5")
    ck.add_argument("--cityscapes-root", default="data/cityscapes")
    ck.add_argument("--toy", action="store_true", help=f"check {TOY_ROOT} (made first if missing)")
    ck.add_argument("--sample", type=non_negative, default=200,
                    help="label files read per split for the ids found, evenly spaced; 0 reads all (default: %(default)s)")
    args = p.parse_args()
    if args.command == "make-toy":
        make_toy(args.root, args.num_source, args.num_target, args.seed, args.source_size, args.target_size,
                 progress=sys.stderr.isatty())
        print(f"wrote {Path(args.root) / 'gta5'} and {Path(args.root) / 'cityscapes'}")
    else:
        resolve_data_roots(args)
        check(args.gta5_root, args.cityscapes_root, args.sample)


if __name__ == "__main__":
    run_main(main)
