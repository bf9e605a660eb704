import glob
import json

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import evaluate
import models
from conftest import call as run
from utils import normalise


def numpy_miou(labels, preds, c=19):
    """mIoU from one numpy confusion matrix over all pixels, written out independently of utils.py."""
    keep = labels != 255
    m = np.bincount(labels[keep] * c + preds[keep], minlength=c * c).reshape(c, c).astype(float)
    tp = np.diag(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (m.sum(0) + m.sum(1) - tp)
    return np.nanmean(iou), iou


def own_predictions(checkpoint, data, tta=False):
    model, _ = models.from_checkpoint(checkpoint)
    model.eval()
    labels, preds = [], []
    with torch.no_grad():
        for i in range(len(data)):
            x, y = data[i]
            x = normalise(x[None])
            logits = model(x)
            if tta:
                logits = (logits + model(x.flip(-1)).flip(-1)) / 2
            if logits.shape[-2:] != y.shape:
                logits = torch.nn.functional.interpolate(logits, size=y.shape, mode="bilinear", align_corners=False)
            labels.append(y.numpy().ravel().astype(np.int64))
            preds.append(logits.argmax(1)[0].numpy().ravel())
    return np.concatenate(labels), np.concatenate(preds)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_reported_miou_equals_a_recomputation_from_the_models_own_predictions(phase1, toy, tmp_path, tta):
    out = tmp_path / "r.json"
    r = run("evaluate.py", "--checkpoint", phase1 / "best.pt", "--dataset", "cityscapes", "--split", "val",
            "--cityscapes-root", toy[1], "--device", "cpu", "--amp", "off", "--workers", "0", "--tta", tta, "--json", out)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    data = datasets.Cityscapes(toy[1], "val", size=(64, 32))
    want, iou = numpy_miou(*own_predictions(phase1 / "best.pt", data, tta == "flip"))
    assert got["miou"] == pytest.approx(want, abs=1e-6) and got["images"] == len(data)
    assert set(got) >= {"miou", "pixel_acc", "per_class", "checkpoint", "dataset", "split", "images"}
    assert list(got["per_class"]) == datasets.CLASS_NAMES
    assert [v if v is not None else float("nan") for v in got["per_class"].values()] == \
        pytest.approx(list(iou), abs=1e-6, nan_ok=True)
    assert "mIoU" in r.stdout and "road" in r.stdout


def test_saved_predictions_round_trip_and_score_the_same_in_cityscapesscripts(phase1, toy, tmp_path, monkeypatch):
    preds, out = tmp_path / "preds", tmp_path / "r.json"
    r = run("evaluate.py", "--checkpoint", phase1 / "best.pt", "--dataset", "cityscapes", "--split", "val",
            "--split-scheme", "official", "--cityscapes-root", toy[1], "--device", "cpu", "--amp", "off", "--workers", "0",
            "--full-res", "--save-preds", preds, "--json", out)
    assert r.returncode == 0, r.stderr
    data = datasets.Cityscapes(toy[1], "val", size=(64, 32), scheme="official")
    data.full_res_labels = True
    _, own = own_predictions(phase1 / "best.pt", data)
    files = [preds / f"{name}_pred_labelIds.png" for name, *_ in data.items]
    stored = np.concatenate([datasets.ID_TO_TRAINID[np.asarray(Image.open(f))].ravel() for f in files])
    assert np.array_equal(stored, own)  # ids written, trainIds read back: the model's argmax
    pytest.importorskip("cityscapesscripts.evaluation")
    monkeypatch.delattr(np, "in1d", raising=False)  # as numpy 2.4 and later: cityscapesscripts calls it
    ev = evaluate.cityscapes_evaluation()
    ev.args.quiet, ev.args.JSONOutput, ev.args.predictionPath = True, False, str(preds)
    gt = sorted(glob.glob(str(toy[1] / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")))
    result = ev.evaluateImgLists([ev.getPrediction(ev.args, g) for g in gt], gt, ev.args)
    assert json.loads(out.read_text())["miou"] == pytest.approx(result["averageScoreClasses"], abs=1e-6)


def test_full_resolution_equals_default_when_the_sizes_agree(phase1, toy, tmp_path):
    """Toy targets are stored at 128x64: at --size 128x64 both protocols must give the same numbers."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--checkpoint", phase1 / "best.pt", "--cityscapes-root", toy[1], "--device", "cpu", "--amp", "off", "--workers", "0",
              "--size", "128x64"]
    assert run("evaluate.py", *common, "--json", a).returncode == 0
    assert run("evaluate.py", *common, "--full-res", "--json", b).returncode == 0
    assert json.loads(a.read_text())["miou"] == json.loads(b.read_text())["miou"]
    c = tmp_path / "c.json"
    assert run("evaluate.py", *common[:-2], "--full-res", "--json", c).returncode == 0  # 64x32 input, 128x64 labels
    assert json.loads(c.read_text())["images"] == json.loads(a.read_text())["images"]
    assert json.loads(c.read_text())["miou"] != json.loads(a.read_text())["miou"]




def test_adabn_scores_like_population_statistics_of_the_target_train_images_whatever_their_labels(phase1, toy,
                                                                                                  tmp_path):
    """--adabn against an independent AdaBN: all target train images in one batch, each BatchNorm layer in
    turn given its input's mean and unbiased variance (numpy) over the whole batch, then our own predictions
    and numpy mIoU. The train labels are not read: removing them changes nothing."""
    no_labels = tmp_path / "cs"
    import shutil
    shutil.copytree(toy[1], no_labels)
    shutil.rmtree(no_labels / "gtFine" / "train")
    common = ["--checkpoint", phase1 / "best.pt", "--gta5-root", toy[0], "--split-scheme", "official",
              "--workers", "0", "--device", "cpu", "--amp", "off"]
    got = {}
    for name, root, extra in (("plain", toy[1], []), ("adabn", toy[1], ["--adabn"]), ("unlabelled", no_labels,
                                                                                        ["--adabn"])):
        r = run("evaluate.py", *common, "--cityscapes-root", root, *extra, "--json", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stderr
        got[name] = json.loads((tmp_path / f"{name}.json").read_text())["miou"]
    assert got["adabn"] == got["unlabelled"] != got["plain"]

    model, _ = models.from_checkpoint(phase1 / "best.pt")
    model.eval()
    train = datasets.Cityscapes(toy[1], "train", size=(64, 32), scheme="official", labels=False)
    x = normalise(torch.stack([train[i][0] for i in range(len(train))]))
    seen = {}

    def keep(m, inputs):
        seen[m] = inputs[0].detach().double().numpy()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(keep) for m in layers]
    with torch.no_grad():
        for _ in layers:  # each pass fixes at least the next layer in forward order
            seen.clear()
            model(x)
            for m, a in seen.items():
                m.running_mean.copy_(torch.from_numpy(a.mean((0, 2, 3))))
                m.running_var.copy_(torch.from_numpy(a.var((0, 2, 3), ddof=1)))
    for h in hooks:
        h.remove()
    torch.save({**torch.load(phase1 / "best.pt", weights_only=True), "model": model.state_dict()}, tmp_path / "a.pt")
    val = datasets.Cityscapes(toy[1], "val", size=(64, 32), scheme="official")
    assert numpy_miou(*own_predictions(tmp_path / "a.pt", val))[0] == pytest.approx(got["adabn"], abs=1e-6)


def test_adabn_refuses_a_model_without_batchnorm_in_one_line(toy):
    import argparse
    import evaluate
    from devices import Context
    from utils import UserError
    args = argparse.Namespace(checkpoint="plain.pt", dataset="cityscapes", cityscapes_root=str(toy[1]), cache=False,
                              cache_dir=None, batch_size=2, workers=0, device="cpu", amp="off")
    common = dict(size=(64, 32), scheme="seed", skip_bad=False, cache=False)
    with pytest.raises(UserError, match=r"^plain.pt: its model has no BatchNorm layer; --adabn has nothing"):
        evaluate.adabn(torch.nn.Conv2d(3, 19, 1), args, Context(args), common)
