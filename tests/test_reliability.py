"""Every script against bad input: exit status, one explanatory line, no traceback, nothing half-written;
and SIGKILL at several points of a run, then --resume, against a run that was never interrupted.

The bad inputs run in this process (each script's main(), as its command line would call it); a few tests
start real processes where the process itself is what is tested."""
import csv
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

from conftest import TINY, call, same_state

REPO = Path(__file__).resolve().parent.parent
TINY = [*TINY, "--epochs", "1", "--batch-size", "4"]


def run(*cmd, cwd=REPO, timeout=600, file_limit=None):
    """A real process, for what only a process shows (exit status of the interpreter, SIGKILL, exit itself).
    file_limit: its files may not grow beyond that many bytes (RLIMIT_FSIZE): a write past it fails with
    EFBIG, as on a full disk or quota."""
    import resource
    limit = None if file_limit is None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit,) * 2))
    return subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit)


@pytest.fixture(scope="module")
def bad(toy, phase1, tmp_path_factory):
    """Broken copies of the toy trees and broken checkpoints, made once."""
    root = tmp_path_factory.mktemp("bad")
    b = {"root": root, "gta": toy[0], "cs": toy[1], "phase1": phase1 / "best.pt"}

    def gta_copy(name, damage):
        dst = root / name
        shutil.copytree(toy[0], dst)
        damage(dst)
        b[name] = dst

    gta_copy("no_label", lambda d: (d / "labels" / "00002.png").unlink())
    gta_copy("no_image", lambda d: (d / "images" / "00002.png").unlink())
    gta_copy("no_split_mat", lambda d: (d / "split.mat").unlink())

    def truncate_all(d):  # every image, so whichever the first batch holds is broken
        for p in (d / "images").glob("*.png"):
            p.write_bytes(p.read_bytes()[:300])
    gta_copy("corrupt", truncate_all)

    def rgb_labels(d):
        for p in (d / "labels").glob("*.png"):
            Image.open(p).convert("RGB").save(p)
    gta_copy("rgb_labels", rgb_labels)

    def ids_out_of_table(d):
        for p in (d / "labels").glob("*.png"):
            a = np.array(Image.open(p))
            a[0, :5] = 200
            Image.fromarray(a).save(p)
    gta_copy("bad_ids", ids_out_of_table)
    (root / "empty" / "images").mkdir(parents=True)
    (root / "empty" / "labels").mkdir()
    b["empty"] = root / "empty"

    (root / "empty.pt").write_bytes(b"")
    b["empty.pt"] = root / "empty.pt"
    data = (phase1 / "best.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 3])
    b["truncated.pt"] = root / "truncated.pt"
    torch.save({"model": {}, "config": {"model": "deeplab"}, "payload": ValueError("code")}, root / "pickled.pt")
    b["pickled.pt"] = root / "pickled.pt"
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    b["foreign.pt"] = root / "foreign.pt"
    ckpt = torch.load(phase1 / "best.pt", weights_only=True)
    ckpt["config"] = {**ckpt["config"], "backbone": "resnet34"}
    torch.save(ckpt, root / "wrong_backbone.pt")
    b["wrong_backbone.pt"] = root / "wrong_backbone.pt"
    ckpt["config"] = {**ckpt["config"], "backbone": "resnet18", "model": "unet"}
    torch.save(ckpt, root / "unet_config.pt")
    b["unet_config.pt"] = root / "unet_config.pt"
    mmd_run = root / "mmd_run"
    done = call("train_mmd.py", "--model", "deeplab", "--size", "64x32", "--workers", "0", "--device", "cpu", "--amp", "off",
               "--gta5-root", toy[0], "--cityscapes-root", toy[1], "--epochs", "1", "--init", phase1 / "best.pt",
               "--train-limit", "4", "--out", mmd_run)
    assert done.returncode == 0, done.stderr
    b["mmd_last"] = mmd_run / "last.pt"
    shutil.copytree(toy[1], root / "cs_no_train")
    shutil.rmtree(root / "cs_no_train" / "leftImg8bit" / "train")
    b["cs_no_train"] = root / "cs_no_train"
    (root / "a_file").write_text("not a folder")
    b["a_file"] = root / "a_file"
    return b


def seg(b, *extra, gta="gta"):
    return ["train_seg.py", "--model", "deeplab", *TINY, "--gta5-root", b[gta], "--cityscapes-root", b["cs"], *extra]


def mmd(b, *extra):
    return ["train_mmd.py", "--model", "deeplab", "--size", "64x32", "--workers", "0", "--device", "cpu", "--amp", "off",
            "--gta5-root", b["gta"], "--cityscapes-root", b["cs"], "--epochs", "1", *extra]


def ev(b, *extra):
    return ["evaluate.py", "--device", "cpu", "--amp", "off", "--workers", "0", "--gta5-root", b["gta"], "--cityscapes-root", b["cs"],
            *extra]


# (name, command, text the one line must contain); {x} stands for an entry of the `bad` fixture
CASES = [
    ("size not WxH", lambda b: seg(b, "--size", "wide"), "argument --size: 'wide'"),
    ("size too small", lambda b: seg(b, "--size", "16x8"), "argument --size: '16x8'"),
    ("unknown model", lambda b: seg(b, "--model", "segformer"), "argument --model: invalid choice: 'segformer'"),
    ("batch of one", lambda b: seg(b, "--batch-size", "1"), "--batch-size 1"),
    ("no epochs", lambda b: seg(b, "--epochs", "0"), "--epochs 0"),
    ("negative lr", lambda b: seg(b, "--lr", "-1"), "--lr -1"),
    ("lambda dice above 1", lambda b: seg(b, "--lambda-dice", "2"), "--lambda-dice 2"),
    ("train limit 0", lambda b: seg(b, "--train-limit", "0"), "--train-limit 0"),
    ("save every -1", lambda b: seg(b, "--save-every-steps", "-1"), "--save-every-steps -1"),
    ("mps absent", lambda b: seg(b, "--device", "mps"), "--device mps"),
    ("fp16 on cpu", lambda b: seg(b, "--amp", "fp16"), "--amp fp16"),
    ("coco for unet", lambda b: seg(b, "--model", "unet", "--weights", "coco"), "--weights coco"),
    ("coco for deeplabv3plus", lambda b: seg(b, "--model", "deeplabv3plus", "--weights", "coco"),
     "torchvision has none for deeplabv3plus"),
    ("coco for resnet18", lambda b: seg(b, "--weights", "coco"), "resnet18"),
    ("weights file missing", lambda b: seg(b, "--weights", "nowhere.pt"), "nowhere.pt"),
    ("resume file missing", lambda b: seg(b, "--resume", "nowhere.pt"), "nowhere.pt"),
    ("gta root missing", lambda b: seg(b, "--gta5-root", b["root"] / "absent"), "absent"),
    ("gta root empty", lambda b: seg(b, gta="empty"), "no image/label pairs"),
    ("image without label", lambda b: seg(b, gta="no_label"), "00002.png"),
    ("label without image", lambda b: seg(b, gta="no_image"), "00002.png"),
    ("official split without split.mat", lambda b: seg(b, "--split-scheme", "official", gta="no_split_mat"),
     "split.mat"),
    ("truncated PNG, read in a worker", lambda b: seg(b, "--workers", "1", gta="corrupt"), "unreadable image"),
    ("colour-coded labels", lambda b: seg(b, gta="rgb_labels"), "mode RGB"),
    ("ids outside the table", lambda b: seg(b, gta="bad_ids"), "[200]"),
    ("out under a file", lambda b: seg(b, "--out", b["a_file"] / "run"), "cannot write"),
    ("cache dir under a file", lambda b: seg(b, "--cache-dir", b["a_file"] / "cache"), "cannot write the cache"),
    ("lam negative", lambda b: mmd(b, "--init", b["phase1"], "--lam", "-1"), "--lam -1"),
    ("lam infinite", lambda b: mmd(b, "--init", b["phase1"], "--lam", "inf"), "--lam inf"),
    ("resume with another lam", lambda b: mmd(b, "--init", b["phase1"], "--lam", "0.5", "--resume",
                                              b["mmd_last"]), "--lam 0.01"),
    ("resume with another coral", lambda b: mmd(b, "--init", b["phase1"], "--coral", "1", "--resume",
                                                b["mmd_last"]), "--coral 0.0"),
    ("coral negative", lambda b: mmd(b, "--init", b["phase1"], "--coral", "-1"), "--coral -1"),
    ("coral not a number", lambda b: mmd(b, "--init", b["phase1"], "--coral", "nan"), "--coral nan"),
    ("sigma zero", lambda b: mmd(b, "--init", b["phase1"], "--sigma", "0"), "--sigma 0"),
    ("entropy weight negative", lambda b: mmd(b, "--init", b["phase1"], "--ent", "-0.1"), "--ent -0.1"),
    ("adversarial weight nan", lambda b: mmd(b, "--init", b["phase1"], "--adv", "nan"), "--adv nan"),
    ("self-training on the report's mask, removed", lambda b: mmd(b, "--init", b["phase1"], "--pseudo", "1"),
     "--pseudo was removed: self-training on the report's uncertainty mask did worse than no method at all in the "
     "benchmark; use --dacs W"),
    ("its decay, removed", lambda b: mmd(b, "--init", b["phase1"], "--pseudo-ema", "0.9"), "--pseudo-ema was removed"),
    ("a second run into a run's folder", lambda b: mmd(b, "--init", b["phase1"], "--lam", "0", "--out",
                                                      b["mmd_last"].parent), "holds a run already (args.json"),
    ("a resume from elsewhere into a run's folder", lambda b: mmd(b, "--init", b["phase1"], "--resume", b["mmd_last"],
                                                                 "--out", b["phase1"].parent), "holds a run already"),
    ("a second phase-1 run into a run's folder", lambda b: seg(b, "--out", b["phase1"].parent), "continue it with --resume"),
    ("fda beta 0", lambda b: mmd(b, "--init", b["phase1"], "--fda", "0"), "--fda 0.0: beta must be in (0, 0.5]"),
    ("fda beta above 0.5", lambda b: mmd(b, "--init", b["phase1"], "--fda", "0.6"), "--fda 0.6"),
    ("discriminator lr 0", lambda b: mmd(b, "--init", b["phase1"], "--adv", "0.001", "--adv-lr", "0"), "--adv-lr 0"),
    ("dacs weight negative", lambda b: mmd(b, "--init", b["phase1"], "--dacs", "-1"), "--dacs -1"),
    ("dacs threshold above 1", lambda b: mmd(b, "--init", b["phase1"], "--dacs", "1", "--dacs-threshold", "1.2"),
     "--dacs-threshold 1.2: must be between 0 and 1"),
    ("dacs blur probability nan", lambda b: mmd(b, "--init", b["phase1"], "--dacs-blur", "nan"), "--dacs-blur nan"),
    ("dacs jitter strength above 0.5", lambda b: mmd(b, "--init", b["phase1"], "--dacs-jitter", "0.8", "0.7"),
     "--dacs-jitter 0.8 0.7"),
    ("dacs ema 1", lambda b: mmd(b, "--init", b["phase1"], "--dacs", "1", "--dacs-ema", "1"), "--dacs-ema 1.0"),
    ("dacs bands covering the image", lambda b: mmd(b, "--init", b["phase1"], "--dacs-ignore", "0.5", "0.5"),
     "--dacs-ignore 0.5 0.5"),
    ("dacs ema negative", lambda b: mmd(b, "--init", b["phase1"], "--dacs-ema", "-0.5"), "--dacs-ema -0.5"),
    ("rcs temperature 0", lambda b: mmd(b, "--init", b["phase1"], "--rcs", "0"), "--rcs 0.0"),
    ("rcs temperature nan", lambda b: mmd(b, "--init", b["phase1"], "--rcs", "nan"), "--rcs nan"),
    ("rcs share above 1", lambda b: mmd(b, "--init", b["phase1"], "--rcs", "0.01", "--rcs-min-share", "2"),
     "--rcs-min-share 2.0"),
    ("resume with rcs added", lambda b: mmd(b, "--init", b["phase1"], "--rcs", "0.01", "--resume", b["mmd_last"]),
     "--rcs"),
    ("resume with dacs added", lambda b: mmd(b, "--init", b["phase1"], "--dacs", "1", "--resume", b["mmd_last"]),
     "--dacs 0.0"),
    ("resume with augmentation added", lambda b: mmd(b, "--init", b["phase1"], "--aug", "--resume", b["mmd_last"]),
     "--aug False"),
    ("unknown bn mode", lambda b: mmd(b, "--init", b["phase1"], "--bn", "sync"),
     "argument --bn: invalid choice: 'sync'"),
    ("resume with another bn mode", lambda b: mmd(b, "--init", b["phase1"], "--bn", "frozen", "--resume",
                                                  b["mmd_last"]), "--bn domain;"),
    ("adabn without target train images", lambda b: ev(b, "--checkpoint", b["phase1"], "--adabn", "--split-scheme",
                                                       "official", "--cityscapes-root", b["cs_no_train"]),
     "--adabn needs the train images of cityscapes"),
    ("log every 0", lambda b: mmd(b, "--init", b["phase1"], "--log-every", "0"), "--log-every 0: must be at least 1"),
    ("log every negative", lambda b: seg(b, "--log-every", "-3"), "--log-every -3: must be at least 1"),
    ("warmup negative", lambda b: seg(b, "--warmup", "-1"), "--warmup -1"),
    ("resume with warmup added", lambda b: mmd(b, "--init", b["phase1"], "--warmup", "10", "--resume", b["mmd_last"]),
     "that run used --warmup 0"),
    ("dist timeout 0", lambda b: seg(b, "--dist-timeout", "0"), "--dist-timeout 0.0"),
    ("evaluate dist timeout nan", lambda b: ev(b, "--checkpoint", b["phase1"], "--dist-timeout", "nan"),
     "--dist-timeout nan"),
    ("init missing", lambda b: mmd(b, "--init", b["root"] / "nope.pt"), "train_seg.py"),
    ("init empty", lambda b: mmd(b, "--init", b["empty.pt"]), "empty"),
    ("init truncated", lambda b: mmd(b, "--init", b["truncated.pt"]), "truncated"),
    ("init with pickled code", lambda b: mmd(b, "--init", b["pickled.pt"]), "pickled"),
    ("init not ours", lambda b: mmd(b, "--init", b["foreign.pt"]), "not a checkpoint of this project"),
    ("init of another model", lambda b: mmd(b, "--init", b["unet_config.pt"]), "do not fit"),
    ("init for another --model", lambda b: mmd(b, "--init", b["phase1"], "--model", "unet"),
     "is a deeplab model, not unet"),
    ("init weights of another backbone", lambda b: mmd(b, "--init", b["wrong_backbone.pt"]), "do not fit"),
    ("resume a phase-1 checkpoint in phase 2",
     lambda b: mmd(b, "--init", b["phase1"], "--resume", b["phase1"].with_name("last.pt")), "written by train_seg.py"),
    ("resume from a best file", lambda b: mmd(b, "--init", b["phase1"], "--resume", b["phase1"]), "holds weights only"),
    ("evaluate with workers -1", lambda b: ev(b, "--checkpoint", b["phase1"], "--workers", "-1"),
     "argument --workers: '-1'"),
    ("save preds at training size", lambda b: ev(b, "--checkpoint", b["phase1"], "--save-preds", b["root"] / "p"),
     "--full-res"),
    ("evaluate a missing checkpoint", lambda b: ev(b, "--checkpoint", b["root"] / "gone.pt"), "gone.pt"),
    ("evaluate test labels", lambda b: ev(b, "--checkpoint", b["phase1"], "--split", "test", "--split-scheme",
                                          "official"), "not public"),
    ("evaluate into an unwritable json", lambda b: ev(b, "--checkpoint", b["phase1"], "--json",
                                                      b["a_file"] / "r.json"), "could not be written"),
    ("visualize threshold", lambda b: ["visualize.py", "predict", "--checkpoint", b["phase1"],
                                       "--entropy-threshold", "2"], "--entropy-threshold 2"),
    ("table of a phase-1 run", lambda b: ["visualize.py", "table", b["phase1"].parent], "not a train_mmd.py run"),
    ("check a missing tree", lambda b: ["datasets.py", "check", "--gta5-root", b["root"] / "absent"], "absent"),
]


@pytest.mark.parametrize("name,command,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(bad, tmp_path, name, command, needle):
    cmd = [str(a) for a in command(bad)]
    if cmd[0].startswith("train") and "--out" not in cmd:
        cmd += ["--out", str(tmp_path / "run")]
    r = call(*cmd)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("warning")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    print(f"{name}: {lines[0]}")  # shown with pytest -rP: the line each bad input gets
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".pt"]
    assert not leftovers, leftovers
    if any(s in needle for s in ("--batch-size", "--epochs", "--lr", "--lambda-dice", "--size", "--amp", "--device")):
        assert not (tmp_path / "run").exists()  # refused before anything was made


def test_what_is_refused_changes_nothing_in_the_run_folder(bad, tmp_path):
    """A second run started into a run's folder, a resume with a changed method setting, a removed flag, a resume of
    a run that used it: one line each, and the folder's files exactly as they were (bytes and times)."""
    run = bad["mmd_last"].parent

    def snapshot():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    before = snapshot()
    old = tmp_path / "old"
    old.mkdir()
    ckpt = torch.load(bad["mmd_last"], weights_only=True)
    ckpt["args"]["pseudo"] = 1.0  # written by a version that had --pseudo
    torch.save(ckpt, old / "last.pt")
    for extra, needle in ((["--lam", "0"], "holds a run already"), (["--resume", "--lam", "0.5"], "that run used --lam"),
                          (["--resume", "--dacs", "1"], "that run used --dacs 0.0"),
                          (["--resume", "--pseudo", "1"], "--pseudo was removed"),
                          (["--resume", old / "last.pt", "--out", old], "that run trained with --pseudo, which was "
                                                                         "removed: ")):
        r = call(*mmd(bad, "--init", bad["phase1"], "--train-limit", "4", "--out", run, *extra))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert "use --dacs W" in r.stderr
    assert snapshot() == before and [p.name for p in old.iterdir()] == ["last.pt"]
    kept = tmp_path / "kept"  # a run whose last.pt was deleted to save space: its best files stay
    kept.mkdir()
    for name in ("best_source.pt", "metrics.csv", "args.json"):
        shutil.copy(run / name, kept / name)
    r = call(*mmd(bad, "--init", bad["phase1"], "--train-limit", "4", "--out", kept, "--resume"))
    assert r.returncode == 2 and "holds a run without its last.pt" in r.stderr and r.stderr.count("\n") == 1
    (kept / "best_source.pt").unlink()
    (kept / "metrics.csv").unlink()  # what a session cut off before its first save leaves: args.json
    r = call(*mmd(bad, "--init", bad["phase1"], "--train-limit", "4", "--out", kept, "--resume"))
    assert r.returncode == 0 and "starting from scratch" in r.stdout, r.stderr


def test_a_user_mistake_in_a_real_process_is_one_line_and_exit_status_2(tmp_path):
    r = run("train_mmd.py", "--toy", "--lam", "-1", "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --lam -1.0: must be a number, 0 or more"]


@pytest.mark.slow
def test_a_bad_image_met_by_a_loader_worker_ends_the_process(bad, tmp_path):
    """The worker's error becomes one line and the process ends. The failed loader's iterator stays in a
    reference cycle until exit, with its workers, which ignore SIGTERM: without sampling.py's exit hook,
    multiprocessing's would terminate() them with it and wait forever (this hung CI once)."""
    cmd = [*seg(bad, "--workers", "1", gta="corrupt"), "--out", tmp_path / "run"]
    r = run(*cmd, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("error: ")] == [r.stderr.strip().splitlines()[-1]]
    assert "unreadable image" in r.stderr


@pytest.mark.parametrize("script", ["train_seg.py", "train_mmd.py", "evaluate.py", "visualize.py", "datasets.py"])
def test_every_script_explains_itself(script):
    r = call(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: ") and r.stderr == ""


@pytest.mark.parametrize("script", ["train_seg.py", "train_mmd.py", "evaluate.py"])
def test_no_flag_is_ambiguous_to_torchrun(script):
    """torchrun's parser looks at the flags after the script too: one that abbreviates two of its own
    (--st: --standalone, --start-method) stops the launch with a usage error."""
    from torch.distributed.run import get_args_parser as torchrun_parser
    import importlib
    theirs = [o for a in torchrun_parser()._actions for o in a.option_strings]
    ours = [o for a in importlib.import_module(script[:-3]).get_args_parser()._actions for o in a.option_strings
            if o not in ("-h", "--help")]
    assert ours and not [o for o in ours if sum(t.startswith(o) for t in theirs) > 1]


def test_skip_bad_leaves_out_unpaired_files_with_a_warning(bad, tmp_path):
    r = call(*seg(bad, "--out", tmp_path / "run", "--skip-bad", gta="no_label"))
    assert r.returncode == 0, r.stderr
    assert "leaving out 1 files" in r.stderr and "00002.png" in r.stderr


@pytest.mark.parametrize("save_every, log_every, kept", [(1, 50, (0, 1)), (4, 1000, None)])
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(phase1, toy, tmp_path, save_every,
                                                                                log_every, kept):
    """lr 1e30 blows the weights up in step 1; step 2's loss is not finite. Read back only at checks, it is
    still reported as step 2's, and found before anything is saved: with saves every step, last.pt stays at
    step 1; with the first save due at step 4 of 6 and no log point before it, steps 3 and 4 run on NaN and
    nothing is written at all."""
    out = tmp_path / "run"
    r = call("train_mmd.py", "--gta5-root", toy[0], "--cityscapes-root", toy[1], "--model", "deeplab", "--size",
             "64x32", "--workers", "0", "--device", "cpu", "--amp", "off", "--init", phase1 / "best.pt", "--out", out,
             "--epochs", "1", "--lr", "1e30", "--batch-size", "2", "--save-every-steps", save_every,
             "--log-every", log_every)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not finite at epoch 1, step 2 (seg_loss=" in lines[0], r.stderr
    if kept is None:
        assert not (out / "last.pt").exists()
    else:
        saved = torch.load(out / "last.pt", weights_only=True)
        assert (saved["epoch"], saved["step"]) == kept


def checkpoint_step(path):
    try:
        c = torch.load(path, weights_only=True, map_location="cpu")
        return c["epoch"] * 1000 + c["step"]
    except Exception:
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["seg", "mmd-methods", "mmd-bn-frozen", "mmd-bn-mixed"])
def test_sigkill_at_several_points_then_resume_gives_the_uninterrupted_weights(toy, phase1, tmp_path, phase):
    """Phase 1, phase 2 with every target-side objective (teacher, discriminator and its optimiser to restore)
    and augmentation under the default --bn (domain: two sets of statistics), and phase 2 under the other
    --bn modes."""
    data = ["--size", "64x32", "--workers", "1", "--device", "cpu", "--amp", "off", "--gta5-root", toy[0], "--cityscapes-root",
            toy[1], "--epochs", "2", "--batch-size", "2", "--hflip", "--deterministic", "--save-every-steps", "1"]
    if phase == "seg":
        common = ["train_seg.py", "--model", "unet", "--backbone", "resnet18", "--weights", "none", *data]
    elif phase == "mmd-methods":
        common = ["train_mmd.py", "--model", "deeplab", "--init", phase1 / "best.pt", *data, "--multilevel", "--ent",
                  "0.1", "--dacs", "1", "--dacs-ignore", "0.1", "0.2", "--rcs", "0.5", "--fda", "0.05", "--adv", "0.01",
                  "--aug"]
    else:
        common = ["train_mmd.py", "--model", "deeplab", "--init", phase1 / "best.pt", *data, "--multilevel",
                  "--bn", phase.rsplit("-", 1)[1]]
    straight = run(*common, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    want = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    out = tmp_path / "killed"
    kills = []
    for target in (2, 5, 1003):  # epoch 1 step 2, epoch 1 step 5, epoch 2 step 3 (epoch*1000 + step)
        proc = subprocess.Popen([sys.executable, *map(str, common), "--out", str(out), "--resume"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and checkpoint_step(out / "last.pt") < target:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(checkpoint_step(out / "last.pt"))
    assert kills == sorted(kills) and kills[0] >= 2 and max(kills) < 2000, kills  # each kill landed mid-run
    final = run(*common, "--out", out, "--resume")
    assert final.returncode == 0, final.stderr
    assert f"resumed from {out / 'last.pt'}: epoch {kills[-1] // 1000}" in final.stdout  # it did continue
    got = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])
    assert same_state(want["extra"], got["extra"]) and len(want["extra"]) == (3 if phase == "mmd-methods" else 0)
    # the epoch sums carried across the kills: every logged figure matches the uninterrupted run
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    read = lambda p: strip(list(csv.DictReader(open(p))))
    assert read(out / "metrics.csv") == read(tmp_path / "straight" / "metrics.csv")


def test_a_second_run_into_the_same_out_is_refused_and_a_dead_runs_lock_taken_over(toy, tmp_path):
    """OUT/.lock names the run writing there: a live one refuses a second run in one line naming it (before
    anything is written); one whose process is gone on this host is taken over with a warning; another
    host's is refused; a finished run leaves no lock."""
    import json
    import socket
    out = tmp_path / "run"
    out.mkdir()
    cmd = ["train_seg.py", "--model", "deeplab", *TINY, "--gta5-root", toy[0], "--cityscapes-root", toy[1],
           "--out", out]
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock = {"pid": live.pid, "host": socket.gethostname(), "started": "2026-11-24 10:00:00"}
        (out / ".lock").write_text(json.dumps(lock))
        r = call(*cmd)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: {out}: another run is writing there (pid {live.pid} on {lock['host']}, started "
            f"2026-11-24 10:00:00); let it finish or choose another --out (if it ran on another machine and is "
            f"gone, delete {out / '.lock'})"]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, the lock left as it was
        (out / ".lock").write_text(json.dumps({**lock, "host": "elsewhere"}))
        assert call(*cmd).returncode == 2
    finally:
        live.kill()
        live.wait()
    (out / ".lock").write_text(json.dumps(lock))  # its process is gone now
    r = call(*cmd)
    assert r.returncode == 0, r.stderr
    assert f"taking over the lock of a run that is gone (pid {live.pid}" in r.stderr
    assert (out / "last.pt").exists() and not (out / ".lock").exists()


@pytest.mark.slow
def test_a_full_disk_on_each_kind_of_file_is_one_line_and_leaves_the_previous_file(toy, phase1, tmp_path):
    """Checkpoint, run files, cache and predictions, each written by a real process that may not write a file
    past a size chosen to fail on it: exit status 2, one line naming the file, the previous version intact,
    no temporary file left."""
    data = ["--gta5-root", toy[0], "--cityscapes-root", toy[1]]
    out = tmp_path / "run"
    seg = ["train_seg.py", "--model", "deeplab", *TINY, *data, "--out", out]
    assert run(*seg).returncode == 0  # epoch 1, no limit
    before = (out / "last.pt").read_bytes()
    cases = {  # kind: (limit in bytes, command, the file named)
        "checkpoint": (len(before) // 2, [*seg, "--epochs", "2", "--resume"], out / "last.pt"),
        "run files": (100, [*seg, "--epochs", "2", "--out", tmp_path / "fresh"], tmp_path / "fresh" / "args.json"),
        "cache": (10_000, [*seg, "--out", tmp_path / "cached", "--cache-dir", tmp_path / "cache"], tmp_path / "cache"),
        "predictions": (100, ["evaluate.py", "--checkpoint", phase1 / "best.pt", *data, "--full-res", "--workers",
                              "0", "--device", "cpu", "--amp", "off", "--save-preds", tmp_path / "preds"], tmp_path / "preds"),
    }
    for kind, (limit, cmd, named) in cases.items():
        r = run(*cmd, file_limit=limit)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {named}"), (kind, r.stderr)
        assert "File too large" in lines[0], (kind, lines[0])
        leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
        assert not leftovers, (kind, leftovers)
    assert (out / "last.pt").read_bytes() == before


def process_of_rank(launcher, rank):
    """The pid of the torchrun worker of this rank (a child of the launcher), once it runs."""
    for _ in range(600):
        for entry in Path("/proc").iterdir():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == launcher.pid and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


def lose_a_rank(toy, out, how, nproc, rank, *extra):
    """torchrun, nproc processes, training far longer than the test: once epoch 1's last.pt is written, `rank`
    gets `how` (SIGKILL, or SIGSTOP: hung). The launcher's exit status, output and seconds from the signal."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", REPO / "train_seg.py",
           "--model", "deeplab", *TINY, "--gta5-root", toy[0], "--cityscapes-root", toy[1], "--batch-size", "2",
           "--epochs", "100", "--out", out, *extra]
    with open(out.parent / "log.txt", "w+") as log:
        launcher = subprocess.Popen(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            victim = process_of_rank(launcher, rank)
            for _ in range(1200):
                if (out / "last.pt").exists() or launcher.poll() is not None:
                    break
                time.sleep(0.1)
            assert launcher.poll() is None and (out / "last.pt").exists(), Path(log.name).read_text()
            os.kill(victim, how)
            signalled = time.monotonic()
            while launcher.poll() is None and "lost contact" not in Path(log.name).read_text():
                time.sleep(0.2)
            seconds = time.monotonic() - signalled
            if how == signal.SIGSTOP:
                os.kill(victim, signal.SIGKILL)  # torchrun would, 30 s after its SIGTERM went unanswered
            launcher.wait(timeout=120)
        finally:
            launcher.kill()
        log.seek(0)
        return launcher.returncode, log.read(), seconds


def assert_one_line_each(rank, nproc, output):
    """Each process that saw the loss says so in one line (the lost one says nothing); torchrun's report names the
    lost rank; no traceback of ours."""
    ours = [line for line in output.splitlines() if line.startswith("error:")]
    pattern = (r"error: rank (\d+) lost contact with another process of the run \(.*\); torchrun's report names the "
               r"one that failed\. A training run continues with --resume")
    ranks = [int(re.fullmatch(pattern, line).group(1)) if re.fullmatch(pattern, line) else None for line in ours]
    assert 1 <= len(ranks) <= nproc - 1 and None not in ranks and rank not in ranks, output
    assert len(set(ranks)) == len(ranks), output
    assert re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)", output), output  # torchrun's ChildFailedError
    assert not re.search(r'File ".*/(engine|utils|train_seg|datasets|models|losses|flags|sampling|files|evaluate)\.py"', output), output


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_stops_the_others_with_one_line_and_resume_goes_on(toy, tmp_path):
    """4 processes: the others do not all notice at once (a process blocked in a collective with a living one
    learns of the loss only when that one leaves); torchrun's agent ends those that have not."""
    out = tmp_path / "run"
    code, output, seconds = lose_a_rank(toy, out, signal.SIGKILL, 4, 2)
    assert code != 0
    assert_one_line_each(2, 4, output)
    print(f"stopped {seconds:.1f} s after the SIGKILL")
    assert seconds < 30, seconds  # a process that ends closes its connections: noticed at once, not at the timeout
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert epoch >= 1 and not (out / ".lock").exists()
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                              *map(str, [REPO / "train_seg.py", "--model", "deeplab", *TINY, "--gta5-root", toy[0],
                                         "--cityscapes-root", toy[1], "--batch-size", "2", "--epochs", epoch + 1,
                                         "--out", out, "--resume"])], capture_output=True, text=True, timeout=300, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'last.pt'}: epoch {epoch}, step 0" in resumed.stdout
    with open(out / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, epoch + 2))


@pytest.mark.slow
def test_a_hung_rank_under_torchrun_stops_the_others_after_the_dist_timeout(toy, tmp_path):
    code, output, seconds = lose_a_rank(toy, tmp_path / "run", signal.SIGSTOP, 2, 1, "--dist-timeout", "3")
    assert code != 0
    assert_one_line_each(1, 2, output)
    assert 3 <= seconds < 3 + 15, seconds  # the timeout and some slack
