"""Pair 2's calibration runs: DeepLabV3 source only, AdaBN on it and the oracle, seed 0, at each --look given.

    python results/calibration/calibrate.py 1.0 0.5 0.25 0.0      # from the repository root; writes runs/calib

The oracle trains once, on the first look's target (the target does not depend on --look). As run on
2026-12-07 (then through toy.make_toy(..., pair=2, look=L), which is toy2.make_toy now: the same bytes); the
runs' own args.json and metrics.csv are beside this file."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bench_adapt  # noqa: E402
import toy2  # noqa: E402

looks = [float(x) for x in sys.argv[1:]]
out = Path("runs/calib").resolve()
common = ["--size", "256x128", "--amp", "bf16", "--cache"]


def data(look):
    d = out / f"look{look}" / "data"
    if not (d / "cityscapes").exists():
        toy2.make_toy(d, num_source=200, num_target=400, seed=0, look=look)
    return ["--gta5-root", str(d / "gta5"), "--cityscapes-root", str(d / "cityscapes")]


def phase1(look, name, extra, epochs):
    return ["train_seg.py", "--model", "deeplab", *data(look), *common, "--channels-last", "--backbone", "resnet18",
            "--weights", "none", "--seed", "0", "--resume", *extra, "--out", str(out / f"look{look}" / name),
            "--epochs", str(epochs)]


cmds = [phase1(looks[0], "oracle", ["--train-on", "cityscapes"], 25)] + [phase1(l, "source_only", [], 15) for l in looks]
bench_adapt.run([c for c in cmds if not bench_adapt.finished(c)], 2)
scores = []
for look in looks:
    best = out / f"look{look}" / "source_only" / "best.pt"
    for name, extra in (("source_only", []), ("adabn", ["--adabn"])):
        scores.append(["evaluate.py", "--checkpoint", str(best), *data(look), *common, "--split", "val", *extra,
                       "--json", str(out / f"look{look}" / f"{name}.val.json")])
scores.append(["evaluate.py", "--checkpoint", str(out / f"look{looks[0]}" / "oracle" / "last.pt"), *data(looks[0]),
               *common, "--split", "val", "--json", str(out / "oracle.val.json")])
bench_adapt.run([c for c in scores if not bench_adapt.finished(c)], 2)
oracle = json.loads((out / "oracle.val.json").read_text())["miou"]
for look in looks:
    s = json.loads((out / f"look{look}" / "source_only.val.json").read_text())["miou"]
    a = json.loads((out / f"look{look}" / "adabn.val.json").read_text())["miou"]
    print(f"look {look}: source only {s:.4f} ({s / oracle:.0%} of the oracle), AdaBN {a:.4f} ({a / oracle:.0%}), "
          f"oracle {oracle:.4f}")
