"""GTA-V and Cityscapes loaders, the two split schemes, and the data constants every script shares.

    python datasets.py make-toy data/toy            # write the built-in pair (toy.py) in data/toy
    python datasets.py make-toy data/toy2 --pair 2  # the second pair (toy2.py): layout and cameras differ too
    python datasets.py check --toy                  # what a tree holds, split by split
"""
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from cityscapesscripts.helpers.labels import labels as CS_LABELS

import cache
from files import open_png, read_mat_vectors
from utils import (IGNORE, NUM_CLASSES, SPLITS, ArgumentParser, UserError, hash_seed, parse_size,
                   run_main, seeded_split, take_limit)

DEFAULT_SIZE = (480, 256)  # W×H
WITHHELD = 254  # the "label" of every pixel of an image read without its label (phase 2's target images)
TOY_ROOT = "data/toy"

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
    im = open_png(path)
    if im.mode in ("I", "I;16", "I;16B", "F"):  # convert("RGB") would clip every value above 255
        raise UserError(f"{path}: image PNG has mode {im.mode} (16-bit or float); expected 8-bit RGB, grey or palette")
    im = im.convert("RGB")
    if im.size != tuple(size):
        im = im.resize(size, Image.BILINEAR)  # Pillow's bilinear widens its support when shrinking: antialiased
    return np.array(im, dtype=np.uint8)


def to_tensors(image, label):
    """uint8 H×W×3 image and H×W label -> uint8 3×H×W image, uint8 H×W label. Batches cross to the device as
    bytes (a quarter of float32's); `utils.normalise` turns them into the network's input there."""
    image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return image, torch.from_numpy(np.ascontiguousarray(label))


# ----------------------------------------------------------------------------- datasets

class SegDataset(torch.utils.data.Dataset):
    """(image, label): image 3×H×W uint8 RGB; label H×W uint8, trainIds 0..18 and 255.

    items: (name, image_path, label_path or None, label_holds_train_ids). Without a label path the label
    is all WITHHELD (254): how target images reach phase 2 without their labels, and after --aug the pixels
    that are padding (255) still differ from the image's own. full_res_labels keeps each label at its
    stored size (evaluation at full resolution).
    """

    def __init__(self, items, size=DEFAULT_SIZE, hflip=False, skip_bad=False, aug=False):
        self.items, self.hflip, self.skip_bad = list(items), hflip, skip_bad
        self.augment = Augment(size) if aug else None
        # the size frames are decoded (and cached) at: --aug zooms in up to Augment.SCALE[1] times, so it starts
        # from frames that much larger, which a zoom shows in detail instead of upsampling --size's pixels
        self.size = tuple(int(round(v * Augment.SCALE[1])) for v in size) if aug else tuple(size)
        self.full_res_labels = False
        self.cache_files, self._cache = None, None

    def __len__(self):
        return len(self.items)

    def __getstate__(self):  # DataLoader workers reopen the memmaps instead of receiving copies of them
        return {**self.__dict__, "_cache": None}

    def use_cache(self, folder):
        """Read the images and labels from the decoded cache in folder (cache.py), built first if missing."""
        self.cache_files = cache.attach(self, folder)
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
            label = np.full(image.shape[:2], WITHHELD, np.uint8)
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

    def __getitem__(self, key):
        """key: an index, or (index, seed) from a training sampler. A sample's randomness (flip, augmentation)
        depends on that pair only, never on a worker's state: workers live across epochs, and a resumed run
        draws alike."""
        index, seed = key if isinstance(key, tuple) else (key, 0)
        image, label = self.read(index)
        if self.hflip and random.Random(f"{seed}/{index}").random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        image, label = to_tensors(image, label)
        if self.augment is not None:
            image, label = self.augment(image, label, hash_seed(seed, index, "aug"))
        return image, label


class Augment:
    """--aug: random scale (0.5 to 2) of the image and its label, a random crop back to the size (padding
    with black and 255, ignored, where the scaled pair is smaller), then colour jitter on the image alone.
    Labels are scaled with nearest neighbours: every value stays a trainId or 255. The scale is relative to
    the size whatever the size of the frame it gets (SegDataset gives it frames 2x larger)."""
    SCALE = (0.5, 2.0)
    JITTER = dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)

    def __init__(self, size):
        from torchvision import tv_tensors
        from torchvision.transforms import v2
        w, h = size
        self.tv = tv_tensors
        self.transform = v2.Compose([
            # (w, h): ScaleJitter divides target_size[0] by the width (its scale is then SCALE's alone)
            v2.ScaleJitter((w, h), scale_range=self.SCALE, antialias=True),
            v2.RandomCrop((h, w), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
            v2.ColorJitter(**self.JITTER)])

    def __call__(self, image, label, seed):
        # transforms.v2 draws from torch's CPU generator: seeded here and put back, so the draw is a function
        # of the seed alone, whichever worker makes it (torch.manual_seed would reseed the GPU's generator too)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            image, label = self.transform(self.tv.Image(image), self.tv.Mask(label))
        return image.as_subclass(torch.Tensor).contiguous(), label.as_subclass(torch.Tensor).contiguous()


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
                 skip_bad=False, cache=False, aug=False):
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
        super().__init__(items, size, hflip, skip_bad, aug)
        if cache:  # True: ROOT/.cache; or a folder (--cache-dir)
            self.use_cache(Path(root) / ".cache" if cache is True else cache)


class Cityscapes(SegDataset):
    """Cityscapes: ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png with ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png.

    scheme 'official': the train/val/test folders (test labels are not public). 'seed': the seeded 60/10/30
    split of the labelled train+val images. labels=False drops labels (all WITHHELD): phase 2's target images.
    """

    def __init__(self, root, split="train", size=DEFAULT_SIZE, scheme="seed", limit=None, hflip=False,
                 seed=0, labels=True, skip_bad=False, cache=False, aug=False):
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
        super().__init__(items, size, hflip, skip_bad, aug)
        if cache:  # True: ROOT/.cache; or a folder (--cache-dir)
            self.use_cache(Path(root) / ".cache" if cache is True else cache)


# ----------------------------------------------------------------------------- command line

def resolve_data_roots(args):
    """--toy: the built-in pair in TOY_ROOT, made with default sizes the first time it is asked for."""
    if args.toy:
        root = Path(TOY_ROOT)
        made = lambda: (root / "gta5").is_dir() and (root / "cityscapes").is_dir()
        if not made():
            import toy  # imported only when it is used: the generator draws for a while
            print(f"making the built-in synthetic pair in {root} (once) ...", file=sys.stderr)
            try:
                toy.make_toy(root, progress=sys.stderr.isatty())
            except UserError:
                if not made():
                    raise  # a half-made pair from elsewhere; another process finishing first is fine
        args.gta5_root, args.cityscapes_root = str(root / "gta5"), str(root / "cityscapes")
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


def _label_ids(labels, sample, tally):
    """Sorted ids found in (an evenly spaced sample of) the label files, each also read by the loaders' own
    read_label: a file it would stop on is added to tally["refused"]. labels: (path, holds_train_ids) pairs."""
    labels = list(labels)
    total = len(labels)
    if sample and total > sample:
        labels = [labels[i] for i in np.linspace(0, total - 1, sample).astype(int)]
    tally["total"] += total
    tally["read"] += len(labels)
    found = np.zeros(65536, bool)
    for path, train_ids in labels:
        im = open_png(path)
        found[np.unique(np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("L")))] = True
        try:
            read_label(path, None, train_ids)
        except UserError as e:
            tally["refused"].append(str(e))
    return " ".join(str(i) for i in np.flatnonzero(found)) + f"  ({len(labels)} of {total} files read)"


def check(gta5_root, cityscapes_root, sample=200):
    """Print what each tree holds; raise UserError when a loader could not use it. Label files are judged by
    the loaders' own rule: a value outside the Cityscapes id table (0..33; trainIds 0..18 and 255) stops
    them, since such a file is an instance, colour or foreign PNG and reading the value as 255 would drop
    labelled pixels without a word; so it fails the check too."""
    tally = {"total": 0, "read": 0, "refused": []}
    print(f"GTA-V  {gta5_root}")
    pairs, unpaired = gta5_pairs(gta5_root)
    print(f"  image/label pairs: {len(pairs)}; files without a partner: {len(unpaired)}")
    for p in unpaired[:10]:
        print(f"    {p}")
    print(f"  image sizes: {_sizes(v[0] for v in pairs.values())}")
    print(f"  label sizes: {_sizes(v[1] for v in pairs.values())}")
    print(f"  label ids: {_label_ids(((v[1], False) for v in pairs.values()), sample, tally)}")
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
            print(f"    label ids: {_label_ids(((v[1], v[2]) for v in with_label), sample, tally)}")
    print("  seed split (labelled train+val): " + ", ".join(
        f"{s} {len(seeded_split(labelled, s))}" for s in SPLITS))
    for dataset in (lambda: GTA5(gta5_root, "train"), lambda: Cityscapes(cityscapes_root, "train")):
        dataset()  # the loaders' own checks: an unusable tree fails here with their one line
    read, total, refused = tally["read"], tally["total"], tally["refused"]
    if refused:
        raise UserError(f"{len(refused)} of the {read} label files read would stop the loaders, e.g. {refused[0]} "
                        "(in training, --skip-bad puts other images in their place)")
    print(f"both trees are usable as far as checked: every image and label header, and {read} of {total} label "
          f"files read whole" + (" (a sample: --sample 0 reads all)" if read < total else "")
          + "; not checked: image pixel data (decoded only when training)"
          + (f", the other {total - read} label files" if read < total else ""))


def get_args_parser():
    import toy  # imported only when it is used: the generator draws for a while
    p = ArgumentParser(description="Make the built-in synthetic GTA-V/Cityscapes pair (toy.py), or check a data tree.")
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-toy", help="write ROOT/gta5 and ROOT/cityscapes in the real layouts and encodings")
    mk.add_argument("root")
    mk.add_argument("--num-source", type=int, default=200, help="GTA-V-like images (default: %(default)s)")
    mk.add_argument("--num-target", type=int, default=200,
                    help="labelled Cityscapes-like images, 3/4 train and 1/4 val, plus 10%% unlabelled test "
                         "(default: %(default)s)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--pair", type=int, choices=(1, 2), default=1,
                    help="1: the domains differ in look (toy.py); 2: also in layout, cameras and shapes, matched to the "
                         "real datasets' class shares (toy2.py) (default: %(default)s)")
    mk.add_argument("--look", type=float, default=None,
                    help="pair 2's source colours, 0 (the target's) to 1 (pair 1's game colours) (default: the "
                         "calibrated toy2.LOOK)")
    mk.add_argument("--source-size", type=parse_size, default=toy.TOY_SOURCE_SIZE, metavar="WxH",
                    help="(default: %sx%s)" % toy.TOY_SOURCE_SIZE)
    mk.add_argument("--target-size", type=parse_size, default=toy.TOY_TARGET_SIZE, metavar="WxH",
                    help="(default: %sx%s)" % toy.TOY_TARGET_SIZE)
    ck = sub.add_parser("check", help="count pairs, sizes and label ids per dataset and split")
    ck.add_argument("--gta5-root", default="data/gta5")
    ck.add_argument("--cityscapes-root", default="data/cityscapes")
    ck.add_argument("--toy", action="store_true", help=f"check {TOY_ROOT} (made first if missing)")
    ck.add_argument("--sample", type=int, default=200,
                    help="label files read per split for the ids found, evenly spaced; 0 reads all (default: %(default)s)")
    return p


def main(args):
    if args.command == "make-toy":
        import toy
        import toy2
        if args.look is not None and args.pair != 2:
            raise UserError(f"--look {args.look}: pair 2's (make-toy --pair 2 --look ...)")
        kw = {"look": args.look} if args.pair == 2 else {}
        (toy2 if args.pair == 2 else toy).make_toy(args.root, args.num_source, args.num_target, args.seed,
                                                   source_size=args.source_size, target_size=args.target_size,
                                                   progress=sys.stderr.isatty(), **kw)
        print(f"wrote {Path(args.root) / 'gta5'} and {Path(args.root) / 'cityscapes'}")
    else:
        if args.sample < 0:
            raise UserError(f"--sample {args.sample}: label files to read per split, 0 (all) or more")
        resolve_data_roots(args)
        check(args.gta5_root, args.cityscapes_root, args.sample)


if __name__ == "__main__":
    run_main(lambda: main(get_args_parser().parse_args()))
