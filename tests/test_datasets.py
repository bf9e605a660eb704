import contextlib
import hashlib
import io
import os
import re
import socket
import subprocess
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

import cache
import datasets as D
import files
import sampling
import toy as T
import toy2 as T2
from conftest import call
from utils import IMAGENET_MEAN, IMAGENET_STD, UserError, normalise, run_main


def expected_train_ids(ids):
    """Per pixel, the trainId cityscapesscripts gives; 255 for ids it does not know or ignores."""
    table = {i: (l.trainId if 0 <= l.trainId < 19 else 255) for i, l in id2label.items()}
    return np.vectorize(lambda i: table.get(int(i), 255))(ids).astype(np.uint8)


def test_id_table_matches_cityscapesscripts():
    ids = np.arange(256)
    assert np.array_equal(D.ID_TO_TRAINID[ids], expected_train_ids(ids))
    assert D.ID_TO_TRAINID[26] == 13 and D.ID_TO_TRAINID[1] == 255 and D.ID_TO_TRAINID[34] == 255
    assert [id2label[int(i)].trainId for i in D.TRAINID_TO_ID] == list(range(19))
    assert len(D.CLASS_NAMES) == 19 and D.CLASS_NAMES[0] == "road" and D.CLASS_NAMES[18] == "bicycle"


@pytest.mark.parametrize("size", [(466, 256), (480, 256), (97, 41)])
def test_gta5_sample_matches_an_independent_decode(toy, size):
    ds = D.GTA5(toy[0], "train", size=size)
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, size[1], size[0]) and x.dtype == torch.uint8
        assert y.shape == (size[1], size[0]) and y.dtype == torch.uint8
        _, image_path, label_path, _ = ds.items[i]
        rgb = np.asarray(Image.open(image_path).convert("RGB").resize(size, Image.BILINEAR))
        assert np.array_equal(x.permute(1, 2, 0).numpy(), rgb)
        want = (rgb / np.float32(255) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        assert np.allclose(normalise(x[None])[0].permute(1, 2, 0).numpy(), want, atol=1e-5)
        raw = np.asarray(Image.open(label_path).resize(size, Image.NEAREST))
        assert np.array_equal(y.numpy(), expected_train_ids(raw))
        assert set(np.unique(y.numpy())) <= set(range(19)) | {255}


def test_cityscapes_sample_and_sizes(toy):
    for size in [(466, 256), (480, 256)]:
        ds = D.Cityscapes(toy[1], "val", size=size, scheme="official")
        x, y = ds[0]
        assert x.shape == (3, 256, size[0]) and y.shape == (256, size[0])
        raw = np.asarray(Image.open(ds.items[0][2]).resize(size, Image.NEAREST))
        assert np.array_equal(y.numpy(), expected_train_ids(raw))


def test_image_and_label_of_different_sizes_are_each_resized(toy):
    gta = toy[0]
    mismatched = [p for p in sorted((gta / "images").glob("*.png"))
                  if Image.open(p).size != Image.open(gta / "labels" / p.name).size]
    assert mismatched, "the toy pair should include GTA-V frames whose image and label sizes differ"
    ds = D.GTA5(gta, "train", size=(64, 32))
    ds.items = [(p.name, p, gta / "labels" / p.name, False) for p in mismatched]
    x, y = ds[0]
    assert x.shape == (3, 32, 64) and y.shape == (32, 64)


def test_seed_split_sizes_disjoint_and_stable(toy):
    names = {s: [it[0] for it in D.GTA5(toy[0], s).items] for s in D.SPLITS}
    n = sum(len(v) for v in names.values())
    assert n == 20
    for split, frac in zip(D.SPLITS, (0.6, 0.1, 0.3)):
        assert abs(len(names[split]) - frac * n) <= 1
    assert not (set(names["train"]) & set(names["val"])) and not (set(names["val"]) & set(names["test"]))
    assert not (set(names["train"]) & set(names["test"]))
    assert names["train"] == [it[0] for it in D.GTA5(toy[0], "train").items]
    keys = [f"{i:05d}.png" for i in range(1000)]
    parts = [D.seeded_split(keys, s, seed=3) for s in D.SPLITS]
    assert [len(p) for p in parts] == [600, 100, 300] and len(set(sum(parts, []))) == 1000
    assert D.seeded_split(keys, "val", seed=3) != D.seeded_split(keys, "val", seed=4)


def test_limit_takes_a_fixed_subset_of_train(toy):
    full = [it[0] for it in D.GTA5(toy[0], "train").items]
    limited = [it[0] for it in D.GTA5(toy[0], "train", limit=5).items]
    assert len(limited) == 5 and set(limited) <= set(full)
    assert limited == [it[0] for it in D.GTA5(toy[0], "train", limit=5).items]
    assert len(D.GTA5(toy[0], "val", limit=1)) == 2  # limit applies to train only


def test_official_gta5_split_follows_split_mat(toy):
    scipy_io = pytest.importorskip("scipy.io")
    mat = scipy_io.loadmat(toy[0] / "split.mat")
    for s in D.SPLITS:
        want = sorted(f"{int(i):05d}.png" for i in mat[f"{s}Ids"].ravel())
        assert [it[0] for it in D.GTA5(toy[0], s, scheme="official").items] == want


def test_mat_reader_reads_compressed_files_written_by_scipy(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    want = {"trainIds": np.arange(1, 300, 3.0)[:, None], "valIds": np.array([[2], [3]], np.int32)}
    scipy_io.savemat(tmp_path / "s.mat", want, do_compression=True)
    got = files.read_mat_vectors(tmp_path / "s.mat")
    assert np.array_equal(got["trainIds"], want["trainIds"].ravel()) and list(got["valIds"]) == [2, 3]


def test_official_split_without_split_mat_is_refused(toy, tmp_path):
    gta = tmp_path / "gta5"
    shutil.copytree(toy[0], gta)
    (gta / "split.mat").unlink()
    with pytest.raises(UserError, match="split.mat"):
        D.GTA5(gta, "train", scheme="official")


def test_cityscapes_schemes(toy):
    cs = toy[1]
    val = D.Cityscapes(cs, "val", scheme="official")
    assert all("/val/" in str(it[1]) for it in val.items) and len(val) == 5
    seed = {s: {it[0] for it in D.Cityscapes(cs, s).items} for s in D.SPLITS}
    pool = set().union(*seed.values())
    assert len(pool) == 20 and not any("berlin" in n for n in pool)  # test folder has no labels: not in the pool
    with pytest.raises(UserError, match="not public"):
        D.Cityscapes(cs, "test", scheme="official")
    unlabelled = D.Cityscapes(cs, "test", scheme="official", labels=False)
    assert (unlabelled[0][1] == D.WITHHELD).all()
    assert (D.Cityscapes(cs, "train", labels=False)[0][1] == D.WITHHELD).all()


def test_cityscapes_reads_label_train_ids_when_that_is_what_exists(toy, tmp_path):
    cs = tmp_path / "cs"
    shutil.copytree(toy[1], cs)
    want = D.Cityscapes(cs, "val", scheme="official", size=(64, 32))[0][1]
    ids_file = sorted((cs / "gtFine" / "val").glob("*/*_labelIds.png"))[0]
    Image.fromarray(D.ID_TO_TRAINID[np.asarray(Image.open(ids_file))]).save(
        str(ids_file).replace("_labelIds.png", "_labelTrainIds.png"))
    ids_file.unlink()
    ds = D.Cityscapes(cs, "val", scheme="official", size=(64, 32))
    assert ds.items[0][3] is True
    assert torch.equal(ds[0][1], want)


def test_grey_and_palette_labels_read_the_same(toy, tmp_path):
    label = sorted((toy[0] / "labels").glob("*.png"))[0]
    assert Image.open(label).mode == "P"
    grey = tmp_path / "grey.png"
    Image.fromarray(np.asarray(Image.open(label))).save(grey)
    assert np.array_equal(D.read_label(label, (50, 30)), D.read_label(grey, (50, 30)))
    rgb = tmp_path / "rgb.png"
    Image.open(label).convert("RGB").save(rgb)
    with pytest.raises(UserError, match="rgb.png.*mode RGB"):
        D.read_label(rgb, (50, 30))


def test_hflip_flips_image_and_label_together(toy):
    plain = D.GTA5(toy[0], "val", size=(64, 32))
    flipping = D.GTA5(toy[0], "val", size=(64, 32), hflip=True)
    x0, y0 = plain[0]
    flips = []
    for seed in range(12):
        x, y = flipping[(0, seed)]
        assert torch.equal(y, flipping[(0, seed)][1])  # the same (index, seed) always flips the same way
        flipped = torch.equal(y, y0.flip(-1)) and torch.allclose(x, x0.flip(-1))
        assert flipped or (torch.equal(y, y0) and torch.allclose(x, x0))
        flips.append(flipped)
    assert any(flips) and not all(flips)
    assert not D.GTA5(toy[0], "val").hflip  # off by default, as in the report


def test_aug_scales_and_crops_image_and_label_together_and_jitters_the_colour_only(tmp_path):
    """An image of 16x16 grey blocks whose grey level rises with the block's trainId. Colour jitter maps grey
    levels through one increasing function, so wherever scaling and cropping kept image and label aligned,
    sorting the interior pixels by label sorts them by grey level too; padding is one colour, labelled 255."""
    w, h, block = 128, 64, 16
    by, bx = np.mgrid[0:h, 0:w] // block
    train_id = (bx * 7 + by * 3) % 19  # neighbouring blocks differ
    (tmp_path / "img.png").write_bytes(b"")
    Image.fromarray(np.repeat((60 + 6 * train_id).astype(np.uint8)[..., None], 3, -1)).save(tmp_path / "img.png")
    Image.fromarray(D.TRAINID_TO_ID[train_id]).save(tmp_path / "lbl.png")
    items = [("a", tmp_path / "img.png", tmp_path / "lbl.png", False)]
    plain, aug = D.SegDataset(items, (w, h)), D.SegDataset(items, (w, h), aug=True)
    assert plain.augment is None  # off by default, as in the report
    x0, y0 = plain[0]
    scales, padded = [], 0
    for seed in range(16):
        x, y = aug[(0, seed)]
        again = aug[(0, seed)]
        assert torch.equal(x, again[0]) and torch.equal(y, again[1])  # a function of (index, seed) alone
        assert x.shape == x0.shape and y.shape == y0.shape and x.dtype == y.dtype == torch.uint8
        labels, grey = y.numpy(), x.numpy()[0].astype(int)
        assert set(np.unique(labels)) <= set(range(19)) | {255}
        if (labels == 255).any():
            padded += 1
            assert len(np.unique(grey[labels == 255])) == 1
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(labels, 2, constant_values=254), (5, 5))  # not at edges
        inner = (windows.min((2, 3)) == windows.max((2, 3))) & (labels != 255)
        present = sorted(set(labels[inner].tolist()))
        assert len(present) >= 3
        for a, b in zip(present, present[1:]):
            assert grey[inner & (labels == a)].max() <= grey[inner & (labels == b)].min(), (seed, a, b)
        runs = [len(r) for row in labels for r in np.split(row, np.flatnonzero(np.diff(row)) + 1)[1:-1]]
        scales.append(np.median(runs) / block)
    assert 0.4 < min(scales) < 0.9 and 1.3 < max(scales) < 2.2, scales  # random scale within 0.5..2
    assert 0 < padded < 16  # zoomed out: padded with 255; zoomed in: cropped
    # an image read without its label: WITHHELD on its own pixels, 255 on the padding, the same crop
    unlabelled = D.SegDataset([("a", tmp_path / "img.png", None, False)], (w, h), aug=True)
    for seed in range(16):
        x, y = aug[(0, seed)]
        xu, yu = unlabelled[(0, seed)]
        assert torch.equal(x, xu) and torch.equal(yu == 255, y == 255) and (yu[y != 255] == D.WITHHELD).all()
    assert any(not torch.equal(aug[(0, s)][0], x0) for s in range(3))


def test_missing_label_and_corrupt_png_name_the_file(toy, tmp_path):
    gta = tmp_path / "gta5"
    shutil.copytree(toy[0], gta)
    (gta / "labels" / "00003.png").unlink()
    with pytest.raises(UserError, match=r"00003\.png.*no partner"):
        D.GTA5(gta, "train")
    shutil.copy(toy[0] / "labels" / "00003.png", gta / "labels" / "00003.png")
    data = (gta / "images" / "00004.png").read_bytes()
    (gta / "images" / "00004.png").write_bytes(data[: len(data) // 2])
    ds = D.GTA5(gta, "train")
    ds.items = [("00004.png", gta / "images" / "00004.png", gta / "labels" / "00004.png", False)]
    with pytest.raises(UserError, match=r"00004\.png: unreadable image"):
        ds[0]
    with pytest.raises(UserError, match="not found"):
        D.GTA5(tmp_path / "nowhere", "train")


def run_check(*args):
    return call("datasets.py", "check", *args)


def test_check_reports_a_good_tree_and_refuses_a_bad_one(toy, tmp_path):
    ok = run_check("--gta5-root", toy[0], "--cityscapes-root", toy[1])
    assert ok.returncode == 0, ok.stderr
    assert "image/label pairs: 20" in ok.stdout and "label ids: " in ok.stdout and "usable" in ok.stdout
    gta = tmp_path / "gta5"
    shutil.copytree(toy[0], gta)
    (gta / "labels" / "00005.png").unlink()
    bad = run_check("--gta5-root", gta, "--cityscapes-root", toy[1])
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "00005.png" in bad.stderr
    missing = run_check("--gta5-root", tmp_path / "absent", "--cityscapes-root", toy[1])
    assert missing.returncode == 2 and "absent" in missing.stderr


def test_check_judges_labels_as_the_loaders_do_and_says_how_much_it_read(toy, tmp_path):
    """An id outside the Cityscapes table (here 200, in one file) stops the loaders; check used to call such
    files "read as 255" and declare the tree usable. Now it fails with one line naming the file, and a good
    tree's verdict says how many label files it read and what it did not check."""
    gta = tmp_path / "gta5"
    shutil.copytree(toy[0], gta)
    label = gta / "labels" / "00003.png"
    a = np.array(Image.open(label))
    a[0, :5] = 200
    Image.fromarray(a).save(label)
    with pytest.raises(UserError, match="holds values"):
        D.read_label(label, None)  # the loaders' own rule
    bad = run_check("--gta5-root", gta, "--cityscapes-root", toy[1], "--sample", "0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "1 of the" in bad.stderr and "00003.png" in bad.stderr
    labelled = 20 + sum(1 for _ in (toy[1] / "gtFine").glob("*/*/*_labelIds.png")
                        if "/test/" not in str(_))
    whole = run_check("--gta5-root", toy[0], "--cityscapes-root", toy[1], "--sample", "0")
    assert whole.returncode == 0 and f"and {labelled} of {labelled} label files read whole;" in whole.stdout
    sampled = run_check("--gta5-root", toy[0], "--cityscapes-root", toy[1], "--sample", "3")
    assert sampled.returncode == 0, sampled.stderr
    assert "(a sample: --sample 0 reads all)" in sampled.stdout and "the other" in sampled.stdout


def test_toy_pair_uses_the_real_layouts_and_encodings(toy):
    gta, cs = toy
    assert all(re.fullmatch(r"\d{5}\.png", p.name) for p in (gta / "images").iterdir())
    assert {p.name for p in (gta / "images").iterdir()} == {p.name for p in (gta / "labels").iterdir()}
    images = sorted((cs / "leftImg8bit").glob("*/*/*.png"))
    pattern = r"(?P<city>[a-z]+)_\d{6}_\d{6}_leftImg8bit\.png"
    assert images and all(re.fullmatch(pattern, p.name) and p.name.startswith(p.parent.name) for p in images)
    for p in (cs / "gtFine").glob("*/*/*_gtFine_labelIds.png"):
        assert Image.open(p).mode == "L"
        if p.parent.parent.name == "test":  # present, as in the release, but void: test labels are not public
            assert not np.asarray(Image.open(p)).any()
            continue
        instances = Path(str(p).replace("_labelIds.png", "_instanceIds.png"))
        assert np.array_equal(np.asarray(Image.open(instances)), np.asarray(Image.open(p)))
        assert (cs / "leftImg8bit" / p.parent.parent.name / p.parent.name /
                p.name.replace("_gtFine_labelIds.png", "_leftImg8bit.png")).exists()
    assert Image.open(next((gta / "labels").iterdir())).mode == "P"
    w, h = Image.open(gta / "labels" / "00001.png").size
    assert abs(w / h - 1914 / 1052) < 0.02
    w, h = Image.open(images[0]).size
    assert w == 2 * h


def test_toy_pair_holds_all_19_classes_and_ids_not_train_ids(toy):
    gta, cs = toy
    for labels in ((gta / "labels").glob("*.png"), (cs / "gtFine").glob("*/*/*_labelIds.png")):
        ids = set()
        for p in labels:
            ids |= set(np.unique(np.asarray(Image.open(p))).tolist())
        assert {int(i) for i in D.TRAINID_TO_ID} <= ids, f"missing classes: {set(D.TRAINID_TO_ID) - ids}"
        assert 33 in ids and max(ids) <= 33  # bicycle is id 33 (trainId 18): the files hold ids, not trainIds


def digest(root):
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("pair", [1, 2])
def test_toy_generator_is_deterministic_for_a_seed(tmp_path, pair):
    make = (T2 if pair == 2 else T).make_toy
    kw = dict(num_source=10, num_target=10, source_size=(96, 53), target_size=(96, 48))
    make(tmp_path / "a", seed=1, **kw)
    make(tmp_path / "b", seed=1, **kw)
    make(tmp_path / "c", seed=2, **kw)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    with pytest.raises(UserError, match="already exists"):
        make(tmp_path / "a", seed=1, **kw)
    r = call("datasets.py", "make-toy", tmp_path / "cli", "--num-source", 10, "--num-target", 10, "--seed", 1,
             "--source-size", "96x53", "--target-size", "96x48", "--pair", pair)  # the command-line entry point
    assert r.returncode == 0 and digest(tmp_path / "cli") == digest(tmp_path / "a")


def pinned(package):
    """The version constraints.txt pins for a package."""
    text = (Path(__file__).parents[1] / "constraints.txt").read_text()
    return re.search(rf"^{package}==([^,\s]+)", text, re.M).group(1)


@pytest.mark.skipif(np.__version__ != pinned("numpy") or Image.__version__ != pinned("pillow"),
                    reason="the bytes are pinned for the exact stack's numpy and Pillow (constraints.txt)")
def test_pair_1_is_still_the_pair_behind_the_published_figures(tmp_path):
    """Pair 1 must not change while pair 2 is added (its figures in docs/ were made from it): the digest of a small
    pair, taken before toy2.py existed, on the exact stack."""
    T.make_toy(tmp_path, num_source=20, num_target=30, seed=3, source_size=(160, 88), target_size=(128, 64))
    assert digest(tmp_path) == "c483a72df3b71dd0ea13b58b6b96ec2c4514095455296a0da644dacc6cf2d56f"


def test_pair_2_target_does_not_depend_on_the_source_look(tmp_path):
    """--look changes the source alone: every calibration point shares one target, so one oracle serves them."""
    kw = dict(num_source=10, num_target=10, seed=0, source_size=(96, 53), target_size=(96, 48))
    T2.make_toy(tmp_path / "a", look=0.0, **kw)
    T2.make_toy(tmp_path / "b", look=1.0, **kw)
    assert digest(tmp_path / "a" / "cityscapes") == digest(tmp_path / "b" / "cityscapes")
    assert digest(tmp_path / "a" / "gta5") != digest(tmp_path / "b" / "gta5")
    for flags, message in ((["--pair", 2, "--look", 1.5], "--look 1.5: from 0"), (["--look", 0.5], "pair 2's")):
        r = call("datasets.py", "make-toy", tmp_path / "c", *flags)
        assert r.returncode == 2 and message in r.stderr and not (tmp_path / "c").exists(), r.stderr


def class_shares(paths):
    """Percent of all pixels per label id over label files."""
    counts = np.zeros(256)
    for p in paths:
        counts += np.bincount(np.asarray(Image.open(p)).ravel(), minlength=256)
    return 100 * counts / counts.sum()


def test_pair_2_class_shares_follow_the_real_datasets(tmp_path):
    """Each class's pixel share in pair 2's label files is near the published share it was built from (T2.SHARES:
    within 35% or 3.5 points for a class of 1% or more, within a factor of 4 or 0.05 points below), and where the
    two real datasets differ by 2x or more, the pair differs the same way."""
    T2.make_toy(tmp_path, num_source=200, num_target=300, seed=0, source_size=(320, 176), target_size=(256, 128))
    made = {"gta5": class_shares((tmp_path / "gta5" / "labels").glob("*.png")),
            "cityscapes": class_shares((tmp_path / "cityscapes" / "gtFine").glob("[tv]*/*/*_labelIds.png"))}
    for name, published in T2.SHARES.items():
        for cid, share in published.items():
            ours = made[name][cid]
            near = abs(ours - share) <= max(0.35 * share, 3.5) if share >= 1 else \
                share / 4 <= ours <= share * 4 or abs(ours - share) <= 0.05
            assert near, (name, id2label[cid].name, ours, share)
    for cid in T2.SHARES["gta5"]:
        real = T2.SHARES["cityscapes"][cid] / T2.SHARES["gta5"][cid]
        if not 0.5 < real < 2:
            ours = made["cityscapes"][cid] / max(made["gta5"][cid], 1e-9)
            assert (ours > 1) == (real > 1), (id2label[cid].name, ours, real)


def test_domains_differ_in_look(toy):
    """The target is noisier and blurrier than the flat game look: a real shift, not a relabelling."""
    def roughness(paths):
        vals = []
        for p in paths:
            g = np.asarray(Image.open(p).convert("L"), np.float32)
            vals.append(np.mean(np.abs(np.diff(g, axis=1)) > 0))  # share of pixels that differ from their neighbour
        return np.mean(vals)
    source = roughness(sorted((toy[0] / "images").glob("*.png"))[:5])
    target = roughness(sorted((toy[1] / "leftImg8bit").glob("*/*/*.png"))[:5])
    assert source < 0.5 < target


def test_cache_returns_exactly_what_decoding_gives_and_follows_file_changes(toy, tmp_path):
    gta = tmp_path / "gta5"
    shutil.copytree(toy[0], gta)
    plain = D.GTA5(gta, "train", size=(64, 32))
    cached = D.GTA5(gta, "train", size=(64, 32), cache=True)
    assert all(torch.equal(a, b) for i in range(len(plain)) for a, b in zip(plain[i], cached[i]))
    first = set((gta / ".cache").iterdir())
    assert len(first) == 2
    D.GTA5(gta, "train", size=(64, 32), cache=True)
    assert set((gta / ".cache").iterdir()) == first  # reused, not rebuilt
    label = gta / "labels" / cached.items[0][0]
    Image.fromarray(np.full((88, 160), 7, np.uint8)).save(label)  # the first label becomes all road
    changed = D.GTA5(gta, "train", size=(64, 32), cache=True)
    assert len(set((gta / ".cache").iterdir())) == 4  # a changed file makes a new cache
    assert (changed[0][1] == 0).all() and not (cached[0][1] == 0).all()
    assert len(set((gta / ".cache").iterdir()) - first) == 2
    D.GTA5(gta, "train", size=(96, 48), cache=True)
    assert len(set((gta / ".cache").iterdir())) == 6  # so does another size


def test_a_cache_file_of_another_shape_is_refused_in_one_line(toy, tmp_path):
    folder = tmp_path / "cache"
    D.GTA5(toy[0], "val", size=(64, 32), cache=folder)
    images = next(folder.glob("*.images.npy"))
    np.save(images, np.zeros((1, 32, 64, 3), np.uint8))  # a foreign or damaged file under the expected name
    with pytest.raises(UserError, match="holds .*not the .*delete it"):
        D.GTA5(toy[0], "val", size=(64, 32), cache=folder)


def test_a_killed_builds_leftovers_are_removed_and_the_cache_is_built_whole(toy, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "cache"
    built = D.GTA5(toy[0], "val", size=(64, 32), cache=folder)
    for f in built.cache_files:  # as a build killed part way leaves them: no cache, a half-written temporary
        (folder / f".tmp-{socket.gethostname()}-{dead.pid}-{f.name}").write_bytes(b"half")
        f.unlink()
    again = D.GTA5(toy[0], "val", size=(64, 32), cache=folder)
    assert sorted(p.name.split(".", 1)[1] for p in folder.iterdir()) == ["images.npy", "labels.npy"]
    assert torch.equal(again[0][0], D.GTA5(toy[0], "val", size=(64, 32))[0][0])


def _cache_in_two_processes(rank, port, folder, gta, builder_fails, out):
    """Rank 0 and 1 of one machine (LOCAL_RANK = rank) ask for the same cache under a gloo process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    if builder_fails and rank == 0:
        def fail(dataset, files):
            raise UserError(f"{folder}: cannot write the cache there (No space left on device)")
        cache.build = fail
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run_main(lambda: torch.save(D.GTA5(gta, "val", size=(64, 32), cache=folder)[0][0], out / f"{rank}.pt"))
        code = 0
    except SystemExit as e:
        code = e.code
    (out / f"{rank}.txt").write_text(f"{code}\n{err.getvalue()}")
    if code == 0:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("builder_fails", [False, True], ids=["built", "builder-fails"])
def test_under_torchrun_the_others_wait_for_their_machines_builder_and_stop_if_it_fails(toy, tmp_path,
                                                                                         builder_fails):
    """The other processes of a machine wait for LOCAL_RANK 0's cache at the process group's barrier and read the
    same bytes; a builder that fails says why in its one line, and the waiting process stops with one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_cache_in_two_processes, nprocs=2,
                                args=(port, tmp_path / "cache", toy[0], builder_fails, tmp_path))
    codes = {r: (tmp_path / f"{r}.txt").read_text().split("\n", 1) for r in range(2)}
    if not builder_fails:
        assert codes[0][0] == codes[1][0] == "0"
        assert torch.equal(torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt"))
        return
    assert codes[0] == ["2", f"error: {tmp_path / 'cache'}: cannot write the cache there (No space left on device)\n"]
    assert codes[1][0] == "1" and re.fullmatch(r"error: rank 1 lost contact with another process of the run \(.*\); "
                                               r"torchrun's report names the one that failed\. .*--resume\n", codes[1][1])


# ----------------------------------------------------------------------------- rare class sampling

def test_class_counts_are_each_labels_histogram_and_kept_beside_the_cache(toy, tmp_path):
    gta = tmp_path / "gta5"
    shutil.copytree(toy[0], gta)
    plain = D.GTA5(gta, "train", size=(64, 32))
    want = np.stack([[(plain[i][1].numpy() == c).sum() for c in range(19)] for i in range(len(plain))])
    assert np.array_equal(sampling.class_counts(plain), want) and want.sum() > 0
    cached = D.GTA5(gta, "train", size=(64, 32), cache=True)
    assert np.array_equal(sampling.class_counts(cached), want)
    kept = [p for p in (gta / ".cache").iterdir() if p.name.endswith(".classes.npy")]
    assert len(kept) == 1 and np.array_equal(np.load(kept[0]), want)
    np.save(kept[0], want * 0 + 1)  # read back, not counted again
    assert (sampling.class_counts(cached) == 1).all()


def test_rare_class_sampling_draws_classes_by_the_tempered_softmax_and_images_holding_them():
    # 4 images, 3 classes; class 2 appears only in image 3 and with 2 pixels there (below min_pixels 3)
    counts = np.pad(np.array([[90, 10, 0], [50, 40, 0], [0, 5, 0], [60, 0, 2]]), ((0, 0), (0, 16)))
    rcs = sampling.RareClassSampling(counts, temperature=0.1, min_pixels=3)
    f = np.array([200, 55]) / 257  # class 2's pixels count in the frequencies, but no image holds enough of it
    p = np.exp((1 - f) / 0.1) / np.exp((1 - f) / 0.1).sum()
    assert rcs.classes == [0, 1] and np.allclose(rcs.probs, p)
    assert [list(rcs.images[c]) for c in (0, 1)] == [[0, 1, 3], [0, 1, 2]]
    draws = rcs(20000, torch.Generator().manual_seed(0))
    assert draws == rcs(20000, torch.Generator().manual_seed(0))  # a function of the generator's seed
    freq = np.bincount(draws, minlength=4) / len(draws)
    # image 2 holds only class 1, image 3 only class 0, images 0 and 1 both
    want = np.array([p[0] / 3 + p[1] / 3, p[0] / 3 + p[1] / 3, p[1] / 3, p[0] / 3])
    assert np.allclose(freq, want, atol=0.015), (freq, want)


def test_aug_zooms_into_the_stored_frame_not_into_the_resized_image(tmp_path):
    """Fine vertical stripes (a 16-pixel period in a 640x352 frame) are 1.6 pixels wide at 64x32, gone in
    the resize; a 2x zoom cut from a frame decoded at 128x64 still shows them. Measured as the mean step
    between neighbouring pixels of the augmented images, against the same Augment given --size frames (how
    --aug worked before)."""
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    stripes = np.zeros((352, 640, 3), np.uint8)
    stripes[:, (np.arange(640) // 8) % 2 == 1] = 255
    for i in range(1, 11):
        Image.fromarray(stripes).save(tmp_path / "images" / f"{i:05d}.png")
        Image.fromarray(np.full((352, 640), 7, np.uint8)).save(tmp_path / "labels" / f"{i:05d}.png")
    aug = D.GTA5(tmp_path, "train", size=(64, 32), aug=True)
    assert aug.size == (128, 64)  # decoded at 2x
    plain = D.GTA5(tmp_path, "train", size=(64, 32))
    step = lambda x: (x[:, :, 1:].float() - x[:, :, :-1].float()).abs().mean().item()
    # colour jitter off, so that only the geometry differs between the two
    aug.augment.transform.transforms.pop()
    ours = [step(aug[(0, seed)][0]) for seed in range(40)]
    before = [step(aug.augment(*plain[0], seed)[0]) for seed in range(40)]
    assert np.mean(ours) > 1.5 * np.mean(before), (np.mean(ours), np.mean(before))
