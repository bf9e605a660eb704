import json
import csv
import math

import numpy as np
import torch
from PIL import Image

import datasets
from conftest import call
from losses import uncertainty_mask


def run(*args):
    return call("visualize.py", *args)


def colours(img):
    return {tuple(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3)}


def test_prediction_grid_has_the_expected_size_and_only_palette_colours(phase1, toy, tmp_path):
    out = tmp_path / "grid.png"
    r = run("predict", "--checkpoint", phase1 / "best.pt", "--cityscapes-root", toy[1], "-n", "3", "--split-scheme", "official",
            "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (4 * 64, 16 + 3 * 32)
    palette = {tuple(c) for c in datasets.PALETTE}
    cells = np.asarray(img.convert("RGB"))[16:]
    prediction, masked = cells[:, 128:192], cells[:, 192:256]
    assert {tuple(c) for c in prediction.reshape(-1, 3)} <= palette
    assert {tuple(c) for c in masked.reshape(-1, 3)} <= palette | {(0, 0, 0)}
    keep = (masked != 0).any(-1)
    assert np.array_equal(masked[keep], prediction[keep])  # masking only blacks out, never recolours


def test_uncertainty_mask_directions():
    uniform = torch.full((1, 19, 1, 1), 1 / 19)
    sure = torch.zeros(1, 19, 1, 1)
    sure[0, 3] = 1
    assert uncertainty_mask(uniform, 0.34, 0.5).item() and not uncertainty_mask(sure, 0.34, 0.5).item()
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 19, 16, 16, generator=g) * 3, 1)
    masked = [uncertainty_mask(probs, t, 0.0).sum().item() for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert masked == sorted(masked, reverse=True) and masked[0] > masked[-1]  # higher threshold, fewer masked
    conf = [uncertainty_mask(probs, 1.0, c).sum().item() for c in (0.1, 0.3, 0.5, 0.7)]
    assert conf == sorted(conf) and conf[-1] > conf[0]
    # normalised entropy: H / log 19 of a two-way split is log 2 / log 19
    two = torch.zeros(1, 19, 1, 1)
    two[0, :2] = 0.5
    h = math.log(2) / math.log(19)
    assert uncertainty_mask(two, h - 1e-4, 0).item() and not uncertainty_mask(two, h + 1e-4, 0).item()


def test_legend_shows_every_class_colour(tmp_path):
    r = run("legend", "--out", tmp_path / "legend.png")
    assert r.returncode == 0, r.stderr
    assert {tuple(c) for c in datasets.PALETTE} <= colours(Image.open(tmp_path / "legend.png"))


def write_run(path, rows):
    path.mkdir()
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "source_val_miou", "target_val_miou", "seg_loss", "mmd_loss", "train_miou"])
        w.writeheader()
        w.writerows(rows)


def test_table_picks_the_best_epochs_of_each_run(tmp_path):
    write_run(tmp_path / "lam0.01", [
        {"epoch": 0, "source_val_miou": 0.50, "target_val_miou": 0.20},
        {"epoch": 1, "source_val_miou": 0.45, "target_val_miou": 0.26, "seg_loss": 1, "mmd_loss": 1, "train_miou": 0.61},
        {"epoch": 2, "source_val_miou": 0.48, "target_val_miou": 0.22, "seg_loss": 1, "mmd_loss": 1, "train_miou": 0.63}])
    write_run(tmp_path / "lam0.05", [
        {"epoch": 0, "source_val_miou": 0.50, "target_val_miou": 0.20},
        {"epoch": 1, "source_val_miou": 0.40, "target_val_miou": 0.30, "seg_loss": 1, "mmd_loss": 1, "train_miou": 0.58}])
    r = run("table", tmp_path / "lam0.01", tmp_path / "lam0.05", "--out", tmp_path / "t.md")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "t.md").read_text()
    source, target = text.split("Best target")
    assert "|  | before adaptation | lam0.01 (epoch 2) | lam0.05 (epoch 1) |" in source
    assert "| Source val mIoU | 0.5000 | 0.4800 | 0.4000 |" in source
    assert "| Source train mIoU |  | 0.6300 | 0.5800 |" in source
    assert "|  | before adaptation | lam0.01 (epoch 1) | lam0.05 (epoch 1) |" in target
    assert "| Target val mIoU | 0.2000 | 0.2600 | 0.3000 |" in target
    bad = run("table", tmp_path / "nothing")
    assert bad.returncode == 2 and "metrics.csv" in bad.stderr


def test_curves_plot_reads_a_run(phase1, tmp_path):
    r = run("curves", phase1, "--out", tmp_path / "c.png")
    assert r.returncode == 0, r.stderr
    img = Image.open(tmp_path / "c.png")
    assert img.size == (990, 360)
    assert (31, 119, 180) in colours(img) and (255, 127, 14) in colours(img)  # matplotlib's first two line colours


def test_a_curve_is_named_by_its_folder_and_its_adaptation_settings(tmp_path):
    import visualize
    run = tmp_path / "control_seed0"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"args": {"lam": 0.0, "multilevel": True, "bn": "mixed"}}))
    assert visualize.run_name(run) == "control_seed0 (lam 0, multilevel, --bn mixed)"
