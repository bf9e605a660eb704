"""A seeded fuzzer over the files users hand the scripts: label and image PNGs, checkpoints, and the run folders
visualize.py reads. Each damaged file must give one line naming it (a UserError, which every script prints as
`error: ...` with exit status 2, and which --skip-bad turns into a warning naming it), or be read exactly as
the undamaged file: never a traceback, never a label or a weight silently read wrong.

The default run takes a few cases of each kind; `pytest --slow` runs the full set (CASES per kind, seeded by
SEED: the same cases every time). Each test prints how its cases ended (pytest -s)."""
import collections
import csv
import io
import json
import random
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import files
import models
from conftest import TINY, call, data_args
from files import read_checkpoint
from utils import UserError

SEED = 1125
CASES = {"label": 120, "image": 80, "checkpoint": 80, "resume": 30, "run": 80}  # pytest --slow: 390 in all
SUBSET = 8  # per kind in the default run: the first cases of the same sequence
SIZE = (64, 32)


def counts(kind):
    return [pytest.param(SUBSET, id="subset"), pytest.param(CASES[kind], id="full", marks=pytest.mark.slow)]


# ----------------------------------------------------------------------------- damaging PNGs

def chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def with_size(data, width, height):
    """The PNG with another width and height in its header (and a header checksum that matches them)."""
    ihdr = data[16:29]
    return data[:8] + chunk(b"IHDR", struct.pack(">II", width, height) + ihdr[8:]) + data[33:]


def bomb(width=8000, height=8000):
    """A valid grey PNG of 64 million pixels in about 60 kB: every checksum right, only its size gives it away."""
    rows = zlib.compressobj(9)
    body = b"".join(rows.compress(b"\0" * (width + 1)) for _ in range(height)) + rows.flush()
    return (files.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def reencoded(path, mode, scale=1):
    im = Image.open(path)
    a = np.asarray(im if im.mode in ("P", "L") else im.convert("L")).astype(np.int64) * scale
    if mode == "I;16":
        out = Image.fromarray(a.astype(np.uint16))
    else:
        out = im.convert(mode)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def damaged_png(rng, path, bomb_bytes, label):
    """(what was done, bytes) for one case."""
    data = path.read_bytes()
    kind = rng.choice(["truncate", "flip header", "flip data", "flip many", "empty", "larger header",
                       "far larger header", "bomb", "mode"])
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind.startswith("flip"):
        d = bytearray(data)
        lo, hi = {"flip header": (0, 33), "flip data": (33, len(d)), "flip many": (0, len(d))}[kind]
        for _ in range(rng.randint(1, 8) if kind == "flip many" else 1):
            d[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        return kind, bytes(d)
    if kind == "empty":
        return kind, b""
    if kind == "larger header":
        w, h = struct.unpack(">II", data[16:24])
        return kind, with_size(data, w + rng.randint(1, w), h + rng.randint(0, h))
    if kind == "far larger header":
        return kind, with_size(data, rng.randint(10_000, 2 ** 31 - 1), rng.randint(10_000, 2 ** 31 - 1))
    if kind == "bomb":
        return kind, bomb_bytes
    if label:  # colour-coded, with alpha, bilevel, or 16-bit instance ids (id x 1000 + n)
        mode, scale = rng.choice([("RGB", 1), ("RGBA", 1), ("LA", 1), ("1", 1), ("I;16", 1000), ("I;16", 1)])
    else:
        mode, scale = rng.choice([("I;16", 257), ("L", 1), ("P", 1), ("RGBA", 1), ("1", 1), ("LA", 1)])
    return f"mode {mode}" + (f" x{scale}" if scale != 1 else ""), reencoded(path, mode, scale)


def one_line_naming(error, path):
    text = str(error)
    assert "\n" not in text and str(path) in text, text


def damaged_reads(rng, n, sources, bomb_png, read, folder, tally):
    """Damage the sources in turn, n cases; yield (case, kind, source, what read(path, SIZE) gave) for each
    file read; a refusal must be one line naming the file (tallied as refused)."""
    for case in range(n):
        source = sources[case % len(sources)]
        kind, data = damaged_png(rng, source, bomb_png, label=read is datasets.read_label)
        path = folder / f"{case:03d}_{source.name}"
        path.write_bytes(data)
        try:
            got = read(path, SIZE)
        except UserError as e:
            one_line_naming(e, path)
            tally[kind, "refused"] += 1
            continue
        yield case, kind, source, got


def read_like_the_readers(path):
    """(checkpoint, model) as evaluate.py and visualize.py read them; a UserError where they would refuse."""
    ckpt = read_checkpoint(path)
    model, _ = models.from_checkpoint(path)
    models.trained_size(ckpt, path)
    return ckpt, model


@pytest.fixture(scope="module")
def bomb_png():
    return bomb()


@pytest.mark.parametrize("n", counts("label"))
def test_damaged_label_pngs_are_refused_in_one_line_or_read_exactly(toy, tmp_path, bomb_png, n):
    rng = random.Random(f"{SEED}-label")
    sources = [next((toy[0] / "labels").glob("*.png")), next(toy[1].glob("gtFine/train/*/*_labelIds.png"))]
    expected = {source: datasets.read_label(source, SIZE) for source in sources}
    tally = collections.Counter()
    for case, kind, source, got in damaged_reads(rng, n, sources, bomb_png, datasets.read_label, tmp_path, tally):
        assert np.array_equal(got, expected[source]), f"case {case} ({kind}): a damaged label read wrong, silently"
        tally[kind, "read exactly"] += 1
    print(f"\n{n} label cases (seed {SEED}):", dict(sorted(tally.items())))
    assert sum(v for (k, how), v in tally.items() if how == "refused") > 0


@pytest.mark.parametrize("n", counts("image"))
def test_damaged_image_pngs_are_refused_in_one_line_or_read_exactly(toy, tmp_path, bomb_png, n):
    rng = random.Random(f"{SEED}-image")
    source = next((toy[0] / "images").glob("*.png"))
    expected = datasets.read_image(source, SIZE)
    tally = collections.Counter()
    for case, kind, _, got in damaged_reads(rng, n, [source], bomb_png, datasets.read_image, tmp_path, tally):
        if kind.startswith("mode"):  # grey, palette, alpha: other encodings of a picture, read as such
            assert got.shape == expected.shape and got.dtype == np.uint8
        else:
            assert np.array_equal(got, expected), f"case {case} ({kind}): a damaged image read wrong, silently"
        tally[kind, "read"] += 1
    print(f"\n{n} image cases (seed {SEED}):", dict(sorted(tally.items())))


def test_skip_bad_turns_a_damaged_png_into_a_warning_naming_it(toy, tmp_path):
    gta = tmp_path / "gta5"
    shutil.copytree(toy[0], gta)
    victim = sorted((gta / "labels").glob("*.png"))[3]
    d = bytearray(victim.read_bytes())
    d[d.index(b"IDAT") + 40] ^= 0x10  # among the pixel data: Pillow alone would decode it
    victim.write_bytes(bytes(d))
    common = ["train_seg.py", "--model", "deeplab", *TINY, "--gta5-root", gta, "--cityscapes-root", toy[1],
              "--epochs", "1", "--batch-size", "4", "--train-limit", "12"]
    strict = call(*common, "--out", tmp_path / "strict")
    assert strict.returncode == 2 and strict.stderr.strip().splitlines() == [
        f"error: {victim}: unreadable image (its 'IDAT' chunk fails its checksum: damaged); re-extract the dataset "
        "or remove this file"]
    data = datasets.GTA5(gta, "train", size=SIZE, skip_bad=True)
    if victim.name not in [Path(it[1]).name for it in data.items]:
        pytest.skip("the damaged file fell outside the train split")
    tolerant = call(*common, "--skip-bad", "--out", tmp_path / "tolerant")
    assert tolerant.returncode == 0, tolerant.stderr
    warnings = [line for line in tolerant.stderr.splitlines() if str(victim) in line]
    assert warnings and all(line.startswith("warning") for line in warnings), tolerant.stderr


# ----------------------------------------------------------------------------- damaging checkpoints

def tensors(obj, prefix=""):
    """Every tensor of a nested checkpoint, by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def without_entry(src, dst, rng):
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        gone = rng.choice(names)
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
            for name in names:
                if name != gone:
                    out.writestr(name, z.read(name))
    return f"zip without {gone.split('/', 1)[-1]}"


def damaged_checkpoint(rng, src, dst):
    """Damage the bytes of a copy of src at dst; returns what was done."""
    kind = rng.choice(["flip", "flip", "flip many", "truncate", "missing entry"])
    if kind == "missing entry":
        return without_entry(src, dst, rng)
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    with open(dst, "r+b") as f:
        if kind == "truncate":
            f.truncate(rng.randrange(size))
        for _ in range({"flip": 1, "flip many": rng.randint(2, 20)}.get(kind, 0)):
            at = rng.randrange(size)
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return kind


@pytest.mark.parametrize("n", counts("checkpoint"))
def test_damaged_checkpoints_are_refused_in_one_line_or_read_exactly(phase1, tmp_path, n):
    rng = random.Random(f"{SEED}-checkpoint")
    originals = {name: tensors(torch.load(phase1 / name, weights_only=True)) for name in ("best.pt", "last.pt")}
    tally = collections.Counter()
    for case in range(n):
        name = ("best.pt", "last.pt")[case % 2]
        path = tmp_path / f"{case:03d}_{name}"
        kind = damaged_checkpoint(rng, phase1 / name, path)
        try:
            ckpt, _ = read_like_the_readers(path)
        except UserError as e:
            one_line_naming(e, path)
            tally[kind.split(" without")[0], "refused"] += 1
        else:
            got = tensors(ckpt)
            assert got.keys() == originals[name].keys() and all(
                torch.equal(got[k], v) for k, v in originals[name].items()), f"case {case} ({kind}): read wrong"
            tally[kind.split(" without")[0], "read exactly"] += 1
        path.unlink()
    print(f"\n{n} checkpoint cases (seed {SEED}):", dict(sorted(tally.items())))


def reshaped(t, rng):
    if t.dim() == 0:
        return torch.zeros(2)
    shape = list(t.shape)
    shape[rng.randrange(len(shape))] += rng.randint(1, 3)
    return torch.zeros(shape, dtype=t.dtype)


def damaged_contents(ckpt, rng):
    """A well-formed file with contents that do not fit: another tensor shape in the weights or the optimiser
    state, a missing or mistyped entry."""
    kind = rng.choice(["model shape", "optimiser shape", "missing weight", "missing entry", "mistyped entry",
                       "size", "config"])
    if kind == "model shape":
        key = rng.choice(sorted(ckpt["model"]))
        ckpt["model"][key] = reshaped(ckpt["model"][key], rng)
    elif kind == "optimiser shape":
        state = ckpt["optimizer"]["state"]
        slot = state[rng.choice(sorted(state))]
        name = rng.choice(sorted(k for k, v in slot.items() if torch.is_tensor(v) and v.dim()))
        slot[name] = reshaped(slot[name], rng)
    elif kind == "missing weight":
        del ckpt["model"][rng.choice(sorted(ckpt["model"]))]
    elif kind == "missing entry":
        key = rng.choice(["optimizer", "scheduler", "rng", "epoch", "history", "config", "model"])
        del ckpt[key]
        kind += f" {key}"
    elif kind == "mistyped entry":
        key = rng.choice(["optimizer", "scheduler", "rng", "epoch", "step", "args", "config", "extra", "model",
                          "history", "best", "partial"])
        ckpt[key] = rng.choice(["text", [1, 2]] + [{"sums": 1}] * (key == "partial"))
        kind += f" {key}"
    elif kind == "size":
        ckpt["args"]["size"] = rng.choice([[64], "64x32", [64, -32], [64.5, 32]])
    else:
        ckpt["config"] = {**ckpt["config"], rng.choice(["model", "backbone", "num_classes"]): rng.choice(
            ["segformer", -1, 0.5, None])}
    return kind


@pytest.mark.parametrize("n", counts("resume"))
def test_checkpoints_whose_contents_do_not_fit_are_refused_by_every_reader(phase1, toy, tmp_path, n):
    """--resume (train_seg.py, in this process), and what evaluate.py and visualize.py call."""
    rng = random.Random(f"{SEED}-resume")
    saved = torch.load(phase1 / "last.pt", weights_only=True)
    tally = collections.Counter()
    for case in range(n):
        ckpt = torch.load(phase1 / "last.pt", weights_only=True)
        kind = damaged_contents(ckpt, rng)
        path = tmp_path / f"{case:03d}_last.pt"
        torch.save(ckpt, path)
        r = call("train_seg.py", "--model", "deeplab", *TINY, *data_args(toy), "--epochs", saved["epoch"],
                 "--batch-size", "4", "--resume", path, "--out", tmp_path / f"run{case}")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and str(path) in lines[0], (kind, r.stderr)
        # evaluate.py and visualize.py read the weights, the configuration and the recorded size only
        readers_concerned = kind in ("model shape", "missing weight", "size", "config") or kind.split()[-1] in (
            "model", "config", "args")
        try:
            _, model = read_like_the_readers(path)
        except UserError as e:
            one_line_naming(e, path)
            assert readers_concerned or kind.split()[-1] == "extra", kind
        else:
            assert not readers_concerned, kind
            assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
        tally[kind] += 1
        path.unlink()  # 190 MB a case
    print(f"\n{n} cases of contents that do not fit (seed {SEED}):", dict(sorted(tally.items())))


# ----------------------------------------------------------------------------- damaging run folders

def damaged_run(rng, src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt"))
    target = dst / rng.choice(["metrics.csv", "metrics.csv", "args.json"])
    data = target.read_bytes()
    kind = rng.choice(["truncate", "flip", "garbage", "empty", "nul", "latin-1", "column", "value"])
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "flip":
        d = bytearray(data)
        d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        data = bytes(d)
    elif kind == "garbage":
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    elif kind == "empty":
        data = b""
    elif kind == "nul":
        data = data.replace(b",", b"\0", 1)
    elif kind == "latin-1":
        data = data + "épisode\n".encode("latin-1")
    elif kind == "column" and target.suffix == ".csv":
        rows = list(csv.reader(data.decode().splitlines()))
        gone = rng.randrange(len(rows[0]))
        data = "\n".join(",".join(r[:gone] + r[gone + 1:]) for r in rows[:1] + rows[1:]).encode()
        if rng.random() < 0.5:  # the header alone lost it
            data = "\n".join([",".join(rows[0][:gone] + rows[0][gone + 1:])] + [",".join(r) for r in rows[1:]]).encode()
    elif kind == "value" and target.suffix == ".csv":
        rows = list(csv.reader(data.decode().splitlines()))
        r, c = rng.randrange(1, len(rows)), rng.randrange(len(rows[0]))
        rows[r][c] = rng.choice(["abc", "1e999x", "--", "nan?", "0.5.1", "inf", "-1"])
        data = "\n".join(",".join(row) for row in rows).encode()
    else:  # args.json of another shape
        data = json.dumps(rng.choice([[1, 2], {"args": [1]}, {"args": {"lam": "much"}}, "text", {"argv": []}])).encode()
    target.write_bytes(data)
    return f"{target.name}: {kind}"


@pytest.mark.parametrize("n", counts("run"))
def test_damaged_run_folders_give_visualize_one_line_or_a_figure(phase1, toy, tmp_path, n):
    run = tmp_path / "mmd"
    r = call("train_mmd.py", "--model", "deeplab", "--size", "64x32", "--workers", "0", "--device", "cpu", "--amp", "off",
             *data_args(toy), "--epochs", "1", "--init", phase1 / "best.pt", "--train-limit", "4", "--out", run)
    assert r.returncode == 0, r.stderr
    rng = random.Random(f"{SEED}-run")
    tally = collections.Counter()
    for case in range(n):
        folder = tmp_path / f"case{case:03d}" / "mmd"
        kind = damaged_run(rng, run, folder)
        command = rng.choice(["table", "curves"])
        r = call("visualize.py", command, folder, "--out", folder / f"{command}.out")
        lines = [line for line in r.stderr.strip().splitlines() if line]
        if r.returncode == 2:
            assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], (kind, r.stderr)
            tally[kind, "refused"] += 1
        else:
            assert r.returncode == 0 and (folder / f"{command}.out").exists(), (kind, r.stderr)
            assert all(line.startswith("warning: ") and "args.json" in line for line in lines), (kind, r.stderr)
            tally[kind, "warned" if lines else "drawn"] += 1
    print(f"\n{n} run folder cases (seed {SEED}):", dict(sorted(tally.items())))
