import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import engine
import models
from conftest import TINY, call, data_args, same_state
from files import atomic_write, read_checkpoint, save_checkpoint
from utils import UserError

REPO = Path(__file__).resolve().parent.parent


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a, b):
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# every target-side objective of train_mmd.py at once, and augmentation
METHODS = ["--ent", "0.1", "--dacs", "1", "--dacs-ignore", "0.1", "0.2", "--rcs", "0.5", "--fda", "0.05", "--adv", "0.01",
           "--aug"]


def phase2(phase1, toy, out, *extra):
    return call("train_mmd.py", "--model", "deeplab", "--size", "64x32", "--workers", "0", "--device", "cpu", "--amp", "off",
                *data_args(toy), "--init", phase1 / "best.pt", "--epochs", "1", "--out", out, *extra)


def test_phase1_writes_its_files_and_one_complete_row_per_epoch(phase1):
    assert {p.name for p in phase1.iterdir()} >= {"args.json", "metrics.csv", "best.pt", "last.pt"}
    table = rows(phase1 / "metrics.csv")
    assert [r["epoch"] for r in table] == ["1", "2"]
    for r in table:
        for col in ("train_loss", "train_miou", "val_loss", "val_miou", "seconds", "lr"):
            assert r[col] != "" and np.isfinite(float(r[col])), col
    best = read_checkpoint(phase1 / "best.pt")
    assert best["metrics"]["val_miou"] == max(float(r["val_miou"]) for r in table)
    assert best["epoch"] == 1 + max(range(2), key=lambda i: float(table[i]["val_miou"]))
    assert best["config"] == {"model": "deeplab", "backbone": "resnet18", "num_classes": 19}
    assert json.loads((phase1 / "args.json").read_text())["args"]["epochs"] == 2
    last = read_checkpoint(phase1 / "last.pt")
    assert {"optimizer", "scheduler", "scaler", "rng", "epoch", "args"} <= last.keys() and last["epoch"] == 2


def test_phase2_writes_its_files_and_rows_and_prints_before_and_after(phase1, toy, tmp_path):
    out = tmp_path / "mmd"
    r = phase2(phase1, toy, out, "--lam", "0.05", "--multilevel", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} >= {"metrics.csv", "best_source.pt", "best_target.pt", "last.pt"}
    table = rows(out / "metrics.csv")
    assert [t["epoch"] for t in table] == ["0", "1", "2"]  # epoch 0: the phase-1 model before adaptation
    for col in ("seg_loss", "mmd_loss", "source_val_miou", "target_val_miou", "seconds"):
        assert np.isfinite(float(table[1][col])), col
    assert "coral_loss" not in table[0]  # a term that is off is neither computed nor logged
    # epoch 0 is the phase-1 model: its source val mIoU is phase 1's best, and it is never chosen as a best
    assert float(table[0]["source_val_miou"]) == pytest.approx(read_checkpoint(phase1 / "best.pt")["metrics"]["val_miou"])
    best_target = read_checkpoint(out / "best_target.pt")
    assert best_target["epoch"] in (1, 2)
    assert best_target["metrics"]["target_val_miou"] == max(float(t["target_val_miou"]) for t in table[1:])
    # the summary: before, last epoch, best-source epoch, and the best-target epoch marked as chosen with labels
    printed = r.stdout[r.stdout.index("source val mIoU  target val mIoU"):].splitlines()[1:5]
    by = lambda col: max(table[1:], key=lambda t: float(t[col]))
    expected = [table[0], table[-1], by("source_val_miou"), by("target_val_miou")]
    for line, row in zip(printed, expected):
        assert re.findall(r"\d\.\d{4}", line) == [f"{float(row[c]):.4f}" for c in ("source_val_miou", "target_val_miou")]
    assert [l.split("(")[0].strip() for l in printed[1:]] == ["last epoch", "best source val epoch", "best target val epoch"]
    assert "chosen with target labels" in printed[3] and "target labels" not in "".join(printed[:3])


def test_best_files_hold_weights_only_and_serve_every_reader(phase1, toy, tmp_path):
    """best.pt: weights, configuration, epoch and metrics; last.pt alone carries the optimiser's state. A best
    file starts phase 2 (the phase2 fixture's --init) and evaluate.py, and --resume refuses it in one line."""
    best, last = read_checkpoint(phase1 / "best.pt"), read_checkpoint(phase1 / "last.pt")
    assert set(best) == {"model", "config", "phase", "args", "epoch", "metrics"}
    assert {"optimizer", "scheduler", "rng", "history"} <= last.keys()
    table = rows(phase1 / "metrics.csv")
    assert best["metrics"]["val_miou"] == max(float(t["val_miou"]) for t in table)
    assert best["epoch"] == int(max(table, key=lambda t: float(t["val_miou"]))["epoch"])
    params = sum(v.numel() * v.element_size() for v in best["model"].values())
    assert (phase1 / "best.pt").stat().st_size < 1.1 * params  # the weights and a little more
    assert (phase1 / "last.pt").stat().st_size > 2.5 * params  # weights + Adam's two moments
    ev = call("evaluate.py", "--checkpoint", phase1 / "best.pt", *data_args(toy), "--dataset", "gta5",
              "--split", "val", "--workers", "0", "--device", "cpu", "--amp", "off", "--json", tmp_path / "ev.json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "ev.json").read_text())["miou"] == pytest.approx(best["metrics"]["val_miou"], abs=2e-3)
    again = call("train_seg.py", "--model", "deeplab", *TINY, *data_args(toy), "--epochs", "3", "--batch-size", "4",
                 "--out", phase1, "--resume", phase1 / "best.pt")
    assert again.returncode == 2 and "holds weights only" in again.stderr


def test_bn_modes_in_phase2_and_every_reader_takes_the_statistics_of_the_data_it_scores(phase1, toy, tmp_path,
                                                                                        monkeypatch):
    """--bn domain: last.pt and the best files carry source and target statistics, and evaluate.py scores each
    dataset with its own (the figures of metrics.csv); --bn frozen: phase 1's statistics, untouched; --bn
    mixed: one set, moved. visualize.py and evaluate.py ask for the statistics of the dataset they show."""
    runs = {}
    for mode in ("domain", "frozen", "mixed"):
        r = phase2(phase1, toy, tmp_path / mode, "--lam", "0", "--bn", mode, "--train-limit", "8")
        assert r.returncode == 0 and f"--bn {mode}" in r.stdout, r.stderr
        runs[mode] = read_checkpoint(tmp_path / mode / "last.pt")["model"]
    start = weights(phase1 / "best.pt")
    stats = lambda state: {k: v for k, v in state.items() if "running_" in k}
    assert set(runs["domain"]) - set(start) == {k.replace("running_", "target_") for k in stats(start)}
    assert set(runs["frozen"]) == set(runs["mixed"]) == set(start)
    assert same_state(stats(runs["frozen"]), stats(start))
    assert any(not torch.equal(runs["frozen"][k], start[k]) for k in start if "weight" in k)  # the rest trains
    assert not any(torch.equal(runs["mixed"][k], start[k]) for k in stats(start) if k.endswith("running_mean"))
    domain = runs["domain"]
    assert not any(torch.equal(domain[k], domain[k.replace("running_", "target_")])
                   for k in stats(start) if k.endswith("running_mean"))
    row = rows(tmp_path / "domain" / "metrics.csv")[-1]
    for dataset, column in (("cityscapes", "target_val_miou"), ("gta5", "source_val_miou")):
        for name in ("best_target.pt", "last.pt"):
            ev = call("evaluate.py", "--checkpoint", tmp_path / "domain" / name, *data_args(toy), "--dataset", dataset,
                      "--batch-size", "4", "--workers", "0", "--device", "cpu", "--amp", "off", "--json", tmp_path / "ev.json")
            assert ev.returncode == 0, ev.stderr
            assert json.loads((tmp_path / "ev.json").read_text())["miou"] == pytest.approx(float(row[column]), abs=1e-6)
    asked = []
    monkeypatch.setattr(models, "from_checkpoint", lambda path, domain="source", f=models.from_checkpoint:
                        asked.append(domain) or f(path, domain))
    for dataset in ("cityscapes", "gta5"):
        v = call("visualize.py", "predict", "--checkpoint", tmp_path / "domain" / "last.pt", *data_args(toy), "-n", "1",
                 "--dataset", dataset, "--device", "cpu", "--workers", "0", "--out", tmp_path / "p.png")
        assert v.returncode == 0, v.stderr
    assert asked == ["target", "source"]


def test_deeplabv3plus_goes_through_both_phases_and_evaluation(toy, tmp_path):
    seg = call("train_seg.py", "--model", "deeplabv3plus", *TINY, *data_args(toy), "--epochs", "1",
               "--batch-size", "4", "--out", tmp_path / "seg")
    assert seg.returncode == 0, seg.stderr
    assert read_checkpoint(tmp_path / "seg" / "best.pt")["config"]["model"] == "deeplabv3plus"
    mmd = call("train_mmd.py", "--model", "deeplabv3plus", "--size", "64x32", "--workers", "0", "--device", "cpu", "--amp", "off",
               *data_args(toy), "--init", tmp_path / "seg" / "best.pt", "--epochs", "1", "--lam", "0.05",
               "--multilevel", "--train-limit", "8", "--out", tmp_path / "mmd")
    assert mmd.returncode == 0, mmd.stderr
    row = rows(tmp_path / "mmd" / "metrics.csv")[1]
    assert float(row["mmd_loss"]) > 0  # its taps feed MMD
    ev = call("evaluate.py", "--checkpoint", tmp_path / "mmd" / "last.pt", *data_args(toy), "--workers", "0",
              "--device", "cpu", "--amp", "off", "--json", tmp_path / "ev.json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "ev.json").read_text())["miou"] == pytest.approx(float(row["target_val_miou"]),
                                                                                  abs=2e-3)


def test_report_sigma_trains_exactly_like_the_lam0_control_and_the_default_does_not(phase1, toy, tmp_path):
    """With σ = 1 every cross-domain kernel value underflows to 0 on real-sized embeddings: MMD² is the
    constant 1/4 + 1/4 of the diagonals, its gradient is zero, and the weights equal the control's."""
    common = ["--deterministic", "--multilevel"]
    control = phase2(phase1, toy, tmp_path / "control", "--lam", "0", *common)
    report = phase2(phase1, toy, tmp_path / "sigma1", "--lam", "0.05", "--sigma", "1", *common)
    default = phase2(phase1, toy, tmp_path / "default", "--lam", "0.05", *common)
    assert control.returncode == report.returncode == default.returncode == 0, control.stderr + report.stderr
    assert float(rows(tmp_path / "sigma1" / "metrics.csv")[1]["mmd_loss"]) == pytest.approx(0.5, abs=1e-6)
    assert same_weights(tmp_path / "control" / "last.pt", tmp_path / "sigma1" / "last.pt")
    assert not same_weights(tmp_path / "control" / "last.pt", tmp_path / "default" / "last.pt")


def test_coral_term_is_logged_and_weighted(phase1, toy, tmp_path):
    a = phase2(phase1, toy, tmp_path / "a", "--lam", "0", "--coral", "1", "--deterministic")
    b = phase2(phase1, toy, tmp_path / "b", "--lam", "0", "--coral", "100", "--deterministic")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra = rows(tmp_path / "a" / "metrics.csv")[1]
    assert float(ra["coral_loss"]) > 0 and "CORAL (--coral 1)" in a.stdout
    assert not same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_each_target_side_objective_changes_training_and_logs_its_terms(phase1, toy, tmp_path):
    """One step each against the lam-0 control on the same batch: each method moves the weights its own way
    and writes its terms to metrics.csv."""
    common = ["--lam", "0", "--train-limit", "4", "--deterministic"]
    assert phase2(phase1, toy, tmp_path / "control", *common).returncode == 0
    # the adversarial control builds the discriminator too, which draws from the generator dropout uses
    assert phase2(phase1, toy, tmp_path / "adv_control", *common, "--adv", "1e-12").returncode == 0
    methods = {"ent": (["--ent", "0.5"], ["ent_loss"]),
               "fda": (["--fda", "0.1"], []), "adv": (["--adv", "0.5"], ["adv_loss", "d_loss"]), "aug": (["--aug"], []),
               "dacs": (["--dacs", "1", "--dacs-threshold", "0"], ["dacs_loss", "dacs_weight"])}
    for name, (flags, columns) in methods.items():
        r = phase2(phase1, toy, tmp_path / name, *common, *flags)
        assert r.returncode == 0, r.stderr
        control = tmp_path / ("adv_control" if name == "adv" else "control") / "last.pt"
        assert not same_weights(control, tmp_path / name / "last.pt"), name
        row = rows(tmp_path / name / "metrics.csv")[1]
        assert all(float(row[c]) > 0 for c in columns), (name, row)
    assert float(rows(tmp_path / "dacs" / "metrics.csv")[1]["dacs_weight"]) == 1.0  # threshold 0: every pixel sure
    saved = read_checkpoint(tmp_path / "adv" / "last.pt")["extra"]
    assert set(saved) == {"discriminator", "d_optimizer"} and len(saved["d_optimizer"]["state"]) == 10  # 5 convs
    assert saved["d_optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_warmup_ramps_the_learning_rate_of_both_phases(phase1, toy, tmp_path):
    """3 steps of 4 + 4 images under --warmup 8: the rate for the next step is lr · 4/8 (engine.lr_factor)."""
    r = phase2(phase1, toy, tmp_path / "run", "--lam", "0", "--train-limit", "12", "--batch-size", "4", "--warmup", "8")
    assert r.returncode == 0, r.stderr
    assert float(rows(tmp_path / "run" / "metrics.csv")[1]["lr"]) == pytest.approx(1e-4 * 4 / 8)


def test_the_dacs_teacher_follows_its_ramp(phase1, toy, tmp_path):
    """DACS's decay min(1 - 1/(t+1), A) with A = 0.9 is 0, 1/2, 2/3 over the first three steps (t = 0, 1, 2):
    the teacher is the plain mean of the model's weights after each step, θ1, (θ1 + θ2)/2, (θ1 + θ2 + θ3)/3
    (a constant decay would give other weights). One step an epoch, one epoch a session: each session's last.pt
    holds θk (a resumed run trains as a straight one: tested on its own)."""
    common = ["--lam", "0", "--dacs", "1", "--dacs-ema", "0.9", "--train-limit", "4", "--deterministic", "--epochs",
              "3", "--session-epochs", "1"]
    runs = []
    for session in range(3):
        r = phase2(phase1, toy, tmp_path / "run", *common, *(["--resume"] if session else []))
        assert r.returncode == 0, r.stderr
        runs.append(read_checkpoint(tmp_path / "run" / "last.pt"))
    assert [run["epoch"] for run in runs] == [1, 2, 3]
    params = {k for k, _ in models.build_model("deeplab", "resnet18").named_parameters()}
    for k in params:
        thetas = [run["model"][k].double() for run in runs]
        for i, run in enumerate(runs):
            want = sum(thetas[:i + 1]) / (i + 1)
            assert torch.allclose(run["extra"]["teacher"][k].double(), want, atol=1e-6), (k, i)
    assert any(not torch.equal(runs[0]["model"][k], runs[2]["model"][k]) for k in params)


def test_under_bn_domain_the_mixed_images_take_the_target_statistics(phase1, toy, tmp_path, monkeypatch):
    """--dacs: each training forward holds n source, n target and n mixed images, the first n normalised as
    source; the teacher's forwards (eval mode) read the target statistics."""
    import batchnorm
    seen, forward = [], batchnorm.DomainBatchNorm.forward

    def record(self, x):
        seen.append((self.training, len(x), self.split if self.training else self.domain))
        return forward(self, x)
    monkeypatch.setattr(batchnorm.DomainBatchNorm, "forward", record)
    r = phase2(phase1, toy, tmp_path / "run", "--lam", "0", "--dacs", "1", "--train-limit", "8", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert {(n, split) for training, n, split in seen if training} == {(6, 2)}
    first = next(i for i, (training, _, _) in enumerate(seen) if training)
    last = max(i for i, (training, _, _) in enumerate(seen) if training)
    assert {(n, d) for training, n, d in seen[first:last + 1] if not training} == {(2, "target")}


def test_a_checkpoint_from_before_the_engine_resumes_and_refuses_a_method_it_did_not_run(phase1, toy, tmp_path):
    """Checkpoints written before `extra`, --coral and the other methods existed hold none of them; those
    from before --bn normalised the mixed batch, and resume as --bn mixed only."""
    out = tmp_path / "run"
    assert phase2(phase1, toy, out, "--epochs", "2", "--session-epochs", "1", "--bn", "mixed").returncode == 0
    old = torch.load(out / "last.pt", weights_only=True)
    del old["extra"]
    for key in ("coral", "aug", "ent", "dacs", "fda", "adv", "bn"):
        del old["args"][key]
    torch.save(old, out / "last.pt")
    for flags in (["--coral", "1"], ["--aug"], ["--dacs", "1"], ["--fda", "0.1"]):
        r = phase2(phase1, toy, out, "--epochs", "2", "--resume", "--bn", "mixed", *flags)
        assert r.returncode == 2 and f"predates {flags[0]}" in r.stderr, r.stderr
    r = phase2(phase1, toy, out, "--epochs", "2", "--resume")
    assert r.returncode == 2 and "that run used --bn mixed" in r.stderr, r.stderr
    r = phase2(phase1, toy, out, "--epochs", "2", "--resume", "--bn", "mixed")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert read_checkpoint(out / "last.pt")["epoch"] == 2


def test_the_worked_example_of_adding_a_method_is_the_code_and_runs_beside_the_control(toy, tmp_path, monkeypatch):
    """docs/methods.md's CORAL example: each line of its code is in the file its comment names, as written there;
    its commands, run as written (tiny: one epoch at 64x32 appended), leave the control's run as it was."""
    import shlex
    page = (REPO / "docs" / "methods.md").read_text().split("## Adding an adaptation method", 1)[1]
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    commands = page.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    for part in code.split("\n# ")[1:]:  # its lines in the file's order (a docstring may come between)
        name, *lines = part.splitlines()
        source = iter(line.strip() for line in (REPO / re.split("[:,]", name)[0]).read_text().splitlines())
        assert all(line.strip() in source for line in lines if line.strip()), name
    shutil.copytree(toy[0], tmp_path / "data" / "toy" / "gta5")
    shutil.copytree(toy[1], tmp_path / "data" / "toy" / "cityscapes")
    monkeypatch.chdir(tmp_path)
    tiny = ["--size", "64x32", "--epochs", "1", "--amp", "off", "--workers", "0", "--device", "cpu"]
    control, method = Path("runs/mmd_deeplab_64x32_lam0"), Path("runs/mmd_deeplab_64x32_lam0_coral1")
    for i, command in enumerate(commands):
        r = call(*shlex.split(command)[1:], *tiny)
        assert r.returncode == 0, r.stderr
        if i == 1:
            before = {p.name: p.read_bytes() for p in control.iterdir()}
    assert {p.name: p.read_bytes() for p in control.iterdir()} == before
    assert "coral_loss" in rows(method / "metrics.csv")[1] and "coral_loss" not in rows(control / "metrics.csv")[1]


def test_phase2_without_phase1_names_the_command_to_run(tmp_path, toy, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = call("train_mmd.py", "--model", "unet", "--size", "64x32", *data_args(toy), "--out", tmp_path / "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "python train_seg.py --model unet --size 64x32" in r.stderr


def test_target_labels_are_never_used_for_training(phase1, toy, tmp_path):
    """Scrambling every target-train label leaves the adapted weights bit for bit the same."""
    cs = tmp_path / "cs"
    shutil.copytree(toy[1], cs)
    train_names = {it[0] for it in datasets.Cityscapes(cs, "train").items}
    for p in (cs / "gtFine").glob("*/*/*_labelIds.png"):
        if p.name.split("_gtFine_")[0] in train_names:
            Image.fromarray(np.random.default_rng(0).integers(0, 34, (48, 96), dtype=np.uint8)).save(p)
    a = phase2(phase1, toy, tmp_path / "a", "--deterministic")
    b = phase2(phase1, (toy[0], cs), tmp_path / "b", "--deterministic")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_sessions_give_the_same_weights_as_a_straight_run(toy, tmp_path):
    common = ["--model", "unet", *TINY, *data_args(toy), "--epochs", "2", "--batch-size", "4", "--hflip",
              "--deterministic", "--scheduler", "poly"]
    straight = call("train_seg.py", *common, "--out", tmp_path / "straight")
    first = call("train_seg.py", *common, "--out", tmp_path / "sessions", "--session-epochs", "1")
    assert straight.returncode == 0 and first.returncode == 0, straight.stderr + first.stderr
    assert read_checkpoint(tmp_path / "sessions" / "last.pt")["epoch"] == 1 and "--resume" in first.stdout
    second = call("train_seg.py", *common, "--out", tmp_path / "sessions", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    assert same_weights(tmp_path / "straight" / "last.pt", tmp_path / "sessions" / "last.pt")
    assert [r["val_miou"] for r in rows(tmp_path / "straight" / "metrics.csv")] == \
           [r["val_miou"] for r in rows(tmp_path / "sessions" / "metrics.csv")]


@pytest.mark.parametrize("script, extra", [
    pytest.param("train_seg.py", ["--aug"], id="seg"), pytest.param("train_mmd.py", [], id="mmd", marks=pytest.mark.slow),
    pytest.param("train_mmd.py", ["--bn", "frozen"], id="mmd-bn-frozen", marks=pytest.mark.slow),
    pytest.param("train_mmd.py", ["--bn", "mixed"], id="mmd-bn-mixed", marks=pytest.mark.slow),
    pytest.param("train_mmd.py", METHODS, id="mmd-methods", marks=pytest.mark.slow)])
def test_sigterm_mid_epoch_saves_and_resume_matches_a_straight_run(phase1, toy, tmp_path, monkeypatch, script, extra):
    """The signal arrives during step 3 of epoch 1; the resumed run ends with the straight run's weights (and
    teacher, discriminator and its optimiser). Phase 2 with a worker: two zipped loaders whose workers live
    across epochs, one of them cut mid-epoch."""
    common = ["--model", "deeplab", *data_args(toy), "--epochs", "2", "--batch-size", "2", "--hflip", "--deterministic",
              *extra]
    if script == "train_seg.py":
        common += TINY
    else:
        common += ["--size", "64x32", "--device", "cpu", "--amp", "off", "--init", phase1 / "best.pt", "--workers", "1"]
    straight = call(script, *common, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    calls, watch = [0], engine.Trainer.watch

    def watch_and_signal(self, loss, logs):  # once per training step, in both phases
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGTERM)
        return watch(self, loss, logs)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(engine.Trainer, "watch", watch_and_signal)
    cut = call(script, *common, "--out", tmp_path / "cut")
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the run gave the handlers back
    assert cut.returncode == 128 + signal.SIGTERM and "continue with --resume" in cut.stdout
    saved = read_checkpoint(tmp_path / "cut" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (0, 3)
    monkeypatch.setattr(engine.Trainer, "watch", watch)
    resumed = call(script, *common, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(tmp_path / "straight" / "last.pt", tmp_path / "cut" / "last.pt")
    a, b = (read_checkpoint(tmp_path / run / "last.pt")["extra"] for run in ("straight", "cut"))
    assert same_state(a, b) and len(a) == (3 if extra == METHODS else 0)
    strip = lambda table: [{k: v for k, v in r.items() if "seconds" not in k} for r in table]
    assert strip(rows(tmp_path / "straight" / "metrics.csv")) == strip(rows(tmp_path / "cut" / "metrics.csv"))


def torchrun(script, *argv, nproc=2):
    # --standalone: torchrun picks a free port itself
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(REPO / script), *map(str, argv)], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_torchrun_two_processes_evaluate_exactly_like_one(odd_toy, tmp_path):
    assert len(datasets.GTA5(odd_toy[0], "val")) % 2 == 1 and len(datasets.Cityscapes(odd_toy[1], "val")) % 2 == 1
    seg = call("train_seg.py", "--model", "deeplab", *TINY, *data_args(odd_toy), "--epochs", "1", "--batch-size", "4",
               "--out", tmp_path / "seg")
    assert seg.returncode == 0, seg.stderr
    common = ["--model", "deeplab", "--size", "64x32", "--workers", "0", "--device", "cpu", "--amp", "off", *data_args(odd_toy),
              "--init", tmp_path / "seg" / "best.pt", "--epochs", "1", "--batch-size", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes: sums split over threads round differently
    try:
        one = call("train_mmd.py", *common, "--out", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    # the target-side objectives train too: the teacher per process, the discriminator averaged like the model
    two = torchrun("train_mmd.py", *common, "--out", tmp_path / "two", *METHODS)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    trained = rows(tmp_path / "two" / "metrics.csv")[1]
    assert all(np.isfinite(float(trained[k])) for k in ("ent_loss", "dacs_loss", "adv_loss", "d_loss"))
    assert set(read_checkpoint(tmp_path / "two" / "last.pt")["extra"]) == {"teacher", "discriminator", "d_optimizer"}
    a, b = rows(tmp_path / "one" / "metrics.csv")[0], rows(tmp_path / "two" / "metrics.csv")[0]
    assert a["source_val_miou"] == b["source_val_miou"] and a["target_val_miou"] == b["target_val_miou"]
    assert [r["epoch"] for r in rows(tmp_path / "two" / "metrics.csv")] == ["0", "1"]  # rank 0 alone wrote it
    assert two.stdout.count("epoch 1:") == 1
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "two").iterdir())


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one_process_with_their_global_batch(toy, tmp_path):
    """2 processes with --batch-size 2 and 1 process with --batch-size 4 see the same images in each step
    (ShardSampler), and with SyncBatchNorm and the loss's sums added over processes compute the same
    gradients, up to float rounding: convolutions over 2 images sum in another order than over 4. Adam
    divides each gradient by its own size, so after an epoch (3 steps) that rounding shows in the weights of
    tiny gradients. The tolerance is therefore what rounding alone does to this run: the single process
    with --channels-last (other kernels, the same arithmetic). DDP must stay within it, for the weights (relative
    to what training changed) and the BatchNorm running statistics (relative to their size); with
    --no-sync-bn, each process normalising over its own 2 images, both are far outside it. U-Net, because
    DeepLabV3's dropout draws from each process's own random numbers."""
    common = ["--model", "unet", *TINY, *data_args(toy), "--epochs", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes
    try:
        ran = [call("train_seg.py", *common, "--batch-size", "4", "--out", tmp_path / out, *extra)
               for out, extra in (("one", []), ("layout", ["--channels-last"]), ("start", ["--lr", "1e-30"]))]
    finally:
        torch.set_num_threads(threads)
    # with one --cache-dir for both processes: built once, by the first, while the other waits for it
    ran.append(torchrun("train_seg.py", *common, "--batch-size", "2", "--out", tmp_path / "two",
                        "--cache-dir", tmp_path / "cache"))
    ran.append(torchrun("train_seg.py", *common, "--batch-size", "2", "--out", tmp_path / "apart", "--no-sync-bn"))
    assert all(r.returncode == 0 for r in ran), [r.stderr[-2000:] for r in ran]
    assert ran[3].stderr.count("caching ") == 2  # the train and the val split, once each
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir()) == ["images.npy"] * 2 + ["labels.npy"] * 2

    def flat(run, buffers):
        w = read_checkpoint(tmp_path / run / "last.pt")["model"]
        return torch.cat([v.flatten() for k, v in w.items() if v.is_floating_point() and ("running" in k) == buffers])
    one, start = flat("one", False), flat("start", False)
    weights = {run: ((flat(run, False) - one).norm() / (one - start).norm()).item() for run in ("layout", "two", "apart")}
    stats = {run: ((flat(run, True) - flat("one", True)).norm() / flat("one", True).norm()).item()
             for run in ("layout", "two", "apart")}
    print(f"off the single process, weights: {weights}; running statistics: {stats}")
    for figures in (weights, stats):
        assert figures["two"] <= figures["layout"] and figures["apart"] > 5 * figures["layout"], figures


@pytest.mark.slow
def test_without_a_terminal_progress_comes_as_plain_lines_and_on_one_the_bar_stays(toy, tmp_path):
    """stderr to a file (Colab's !python, a batch job): a line every --log-every steps with epoch, step/steps,
    the running loss, images/s and the epoch's ETA; none at an epoch's last step (the epoch line follows).
    stderr on a terminal (a pty): tqdm's bar, and none of those lines."""
    cmd = [sys.executable, str(REPO / "train_seg.py"), "--model", "deeplab", *map(str, TINY), *map(str, data_args(toy)),
           "--epochs", "2", "--batch-size", "2", "--log-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        r = subprocess.run(cmd + ["--out", str(tmp_path / "file")], stdout=subprocess.PIPE, stderr=err, text=True,
                           timeout=600, cwd=REPO, env=env)
    text = (tmp_path / "stderr.txt").read_text()
    assert r.returncode == 0, text
    lines = [l for l in text.splitlines() if l.startswith("epoch ")]
    pattern = r"epoch (\d)/2 step (\d)/6: train_loss \d+\.\d{4}, \d+\.\d images/s, ETA \d+m\d\ds"
    assert all(re.fullmatch(pattern, l) for l in lines), lines
    assert [re.match(pattern, l).groups() for l in lines] == [("1", "2"), ("1", "4"), ("2", "2"), ("2", "4")]
    assert "\r" not in text
    import fcntl
    import pty
    import struct
    import termios
    import threading
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns: no bar
    shown = []

    def read():  # while the run writes: a pty holds only a few kB, and what is not read may be lost at its end
        while True:
            try:
                chunk = os.read(parent, 65536)
            except OSError:  # closed
                return
            if not chunk:
                return
            shown.append(chunk)
    reader = threading.Thread(target=read)
    reader.start()
    r = subprocess.run(cmd + ["--out", str(tmp_path / "tty")], stdout=subprocess.PIPE, stderr=child, timeout=600,
                       cwd=REPO, env=env)
    os.close(child)
    reader.join(10)
    os.close(parent)
    shown = b"".join(shown)
    assert r.returncode == 0
    assert b"\r" in shown and b"epoch 1/2" in shown and b"step 2/6:" not in shown


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(3)}}, path)

    def dies_half_way(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(3)}}, path)

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"last\.pt: could not be written .*previous checkpoint is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_killed_writer_never_leaves_a_corrupt_checkpoint(tmp_path):
    """SIGKILL a process that keeps rewriting a 40 MB checkpoint; whatever is left must load."""
    path = tmp_path / "last.pt"
    code = ("import sys, torch; sys.path.insert(0, %r); from files import save_checkpoint\n"
            "for i in range(1, 10_000):\n"
            "    save_checkpoint(%r, {'model': {'w': torch.full((10_000_000,), float(i))}})\n"
            % (str(REPO), str(path)))
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(600):
            if path.exists():
                break
            time.sleep(0.05)
        time.sleep(0.7)  # several rewrites later, most likely in the middle of one
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    w = read_checkpoint(path)["model"]["w"]
    assert w.shape == (10_000_000,) and (w == w[0]).all()


def test_training_with_the_cache_gives_the_same_weights(toy, tmp_path):
    gta, cs = tmp_path / "gta5", tmp_path / "cs"
    shutil.copytree(toy[0], gta)
    shutil.copytree(toy[1], cs)
    common = ["--model", "unet", *TINY, "--gta5-root", gta, "--cityscapes-root", cs, "--epochs", "1",
              "--batch-size", "4", "--deterministic", "--hflip"]
    a = call("train_seg.py", *common, "--out", tmp_path / "a")
    b = call("train_seg.py", *common, "--out", tmp_path / "b", "--cache")
    c = call("train_seg.py", *common, "--out", tmp_path / "c", "--cache-dir", tmp_path / "elsewhere")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    assert len(list((gta / ".cache").iterdir())) == 4  # train and val, images and labels
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == sorted(p.name for p in (gta / ".cache").iterdir())
    assert same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert same_weights(tmp_path / "a" / "last.pt", tmp_path / "c" / "last.pt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_phase2_step_on_cuda_never_waits_for_the_gpu(phase1, toy, tmp_path, amp):
    """--sync-debug turns any host-device synchronisation inside a training step into an error; every
    target-side objective is on."""
    r = call("train_mmd.py", "--model", "deeplab", "--size", "64x32", "--workers", "1", "--device", "cuda",
             *data_args(toy), "--init", phase1 / "best.pt", "--epochs", "1", "--out", tmp_path / "run",
             "--multilevel", "--coral", "0.1", "--channels-last", "--amp", amp, "--sync-debug", "--log-every", "1000",
             *METHODS)
    assert r.returncode == 0, r.stderr
    assert len(rows(tmp_path / "run" / "metrics.csv")) == 2  # epoch 0 and the trained epoch


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple's MPS")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_phase2_trains_on_apple_gpus_with_mixed_precision(phase1, toy, tmp_path, amp):
    """fp16 (an M1 has no bf16) with the gradient scaler, whose state last.pt keeps; bf16 (M2 and later)."""
    r = call("train_mmd.py", "--model", "deeplab", "--size", "64x32", "--workers", "0", "--device", "mps",
             *data_args(toy), "--init", phase1 / "best.pt", "--epochs", "1", "--out", tmp_path / "run",
             "--multilevel", "--amp", amp)
    assert r.returncode == 0, r.stderr
    row = rows(tmp_path / "run" / "metrics.csv")[1]
    assert np.isfinite(float(row["seg_loss"])) and np.isfinite(float(row["mmd_loss"]))
    scaler = read_checkpoint(tmp_path / "run" / "last.pt")["scaler"]
    assert bool(scaler) == (amp == "fp16")  # the scaler's scale and growth tracker, saved for --resume


@pytest.mark.slow
def test_compiled_phase2_trains_like_eager(phase1, toy, tmp_path):
    """--compile on a real model, through the forward hooks that take the taps: the logged losses of two
    epochs agree with eager's to 2% (compiled kernels fuse and round differently; the runs share every input)."""
    eager = phase2(phase1, toy, tmp_path / "eager", "--multilevel", "--epochs", "2", "--deterministic")
    torch._dynamo.reset()
    compiled = phase2(phase1, toy, tmp_path / "compiled", "--multilevel", "--epochs", "2", "--deterministic",
                      "--compile")
    assert eager.returncode == compiled.returncode == 0 and "--compile" not in compiled.stderr, compiled.stderr
    a, b = rows(tmp_path / "eager" / "metrics.csv"), rows(tmp_path / "compiled" / "metrics.csv")
    for ra, rb in zip(a[1:], b[1:]):
        for key in ("seg_loss", "mmd_loss"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=0.02), (key, ra, rb)
    assert a[1]["seg_loss"] != a[2]["seg_loss"]  # the curve moved: there is something to match
