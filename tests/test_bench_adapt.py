"""bench_adapt.py's choices and arithmetic, with its training runs replaced by files of known numbers."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench_adapt
from conftest import call

# target val mIoU each method, and each --bn mode of the control, adds to the default control's 0.20; source-only
# scores 0.20 on the target, AdaBN 0.30 (0.25 on the --bn mixed control's weights), the oracle 0.50
EFFECTS = {"--lam": 0.05, "--ent": -0.01, "--fda": 0.10, "--adv": 0.0, "--aug": 0.03,
           "--dacs": 0.04, "--rcs": 0.01, "frozen": -0.01, "mixed": -0.10}


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace bench_adapt.run by a writer of args.json and metrics.csv (evaluate.py: its JSON); returns the
    commands it got."""
    calls = []

    def fake(cmds, jobs):
        # the commands of one call may run at once: none may start from a model that another of them trains
        for c in cmds:
            for flag in ("--init", "--checkpoint"):
                assert flag not in c or (Path(c[c.index(flag) + 1]).parent / "metrics.csv").exists(), c
        for cmd in cmds:
            write(cmd)

    def write(cmd):
        calls.append(cmd)
        if cmd[0] == "evaluate.py":
            mixed = "control_bnmixed" in cmd[cmd.index("--checkpoint") + 1]  # AdaBN on that control's weights
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"miou": 0.25 if mixed else 0.30}))
            return
        out, epochs = Path(cmd[cmd.index("--out") + 1]), int(cmd[cmd.index("--epochs") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({"argv": cmd}))
        if cmd[0] == "train_seg.py":
            (out / "best.pt").write_text("")
            lines = ["epoch,val_miou"] + [f"{e},{0.50 if '--train-on' in cmd else 0.60}" for e in range(1, epochs + 1)]
        else:
            seed = int(cmd[cmd.index("--seed") + 1])
            on = [f for f in EFFECTS if f in cmd and (f != "--lam" or cmd[cmd.index(f) + 1] != "0")]
            target = 0.20 + sum(EFFECTS[f] for f in on) + 0.002 * seed
            (out / "last.pt").write_text("")
            lines = ["epoch,source_val_miou,target_val_miou", "0,0.6,0.2"]
            lines += [f"{e},0.7,{target if e == epochs else 0.1}" for e in range(1, epochs + 1)]
        (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(bench_adapt, "run", fake)
    return calls


def row(table, label):
    """The cells of the row that starts with label."""
    line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def section(table, title):
    return table.split(f"### {title}\n")[1].split("###")[0]


def test_rows_seeds_and_the_best_method(fake_runs, tmp_path):
    common = ["bench_adapt.py", "--out", tmp_path, "--seeds", "0", "1", "--num-source", "20", "--num-target", "20"]
    r = call(*common, "--epochs2", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "gta5" / "split.mat").exists()  # its own pair
    table = (tmp_path / "results.md").read_text()
    deeplab = section(table, "DeepLabV3")
    # baselines: gap closed counts from the better of source-only (0.20) and AdaBN (0.30) to the oracle (0.50)
    assert row(deeplab, "source only")[3:] == ["0.2000 ± 0.0000", "", "-50%"]
    assert row(deeplab, "source only + AdaBN")[1:5] == ["2", "", "0.3000 ± 0.0000", ""]
    assert row(deeplab, "target oracle")[3] == "0.5000 ± 0.0000"
    # seeds 0 and 1 add 0 and 0.002: the means are the effects + 0.001
    control = row(deeplab, "control (lam 0), --bn domain (default)")
    assert control[1:] == ["2", "0.7000 ± 0.0000", "0.2010 ± 0.0014", "+0.0000", f"{(0.201 - 0.3) / 0.2:.0%}"]
    assert row(deeplab, "control (lam 0), --bn mixed (before --bn)")[4] == "-0.1000"
    assert row(deeplab, "control (lam 0), --bn frozen")[4] == "-0.0100"
    assert row(deeplab, "the --bn mixed control's weights with AdaBN")[1:5] == ["2", "", "0.2500 ± 0.0000", "+0.0490"]
    # each method other than MMD on the first seed; the best of them (FDA) on every seed; the rows named by the
    # methods' declarations in train_mmd.py
    assert row(deeplab, "entropy minimisation (--ent 0.1)")[1:5] == ["1", "0.7000", "0.1900", "-0.0110"]
    best = row(deeplab, "FDA (--fda 0.05)")
    assert "chosen with target labels" in best[0] and best[1] == "2" and best[4] == "+0.1000"
    assert row(deeplab, "MMD")[1] == "2" and row(deeplab, "MMD")[4] == "+0.0500"
    dacs, dacs_rcs = "DACS self-training (--dacs 1) |", "DACS self-training (--dacs 1), rare class sampling (--rcs 0.01)"
    assert row(deeplab, dacs)[1] == "2" and row(deeplab, dacs)[4] == "+0.0400"
    assert row(deeplab, dacs_rcs)[1] == "2" and row(deeplab, dacs_rcs)[4] == "+0.0500"
    assert row(deeplab, "augmentation (--aug)")[4] == "+0.0290"  # seed 0 only: 0.23 against the mean 0.201
    for title, seeds in (("U-Net", 2), ("DeepLabV3+", 1)):
        rows = [line.split("|")[1].strip() for line in section(table, title).splitlines() if line.startswith("| ")]
        assert rows[1:] == ["source only (phase 1)", "source only + AdaBN", "target oracle (trained on target labels)",
                            "control (lam 0), --bn domain (default)", "control (lam 0), --bn frozen",
                            "control (lam 0), --bn mixed (before --bn)", "the --bn mixed control's weights with AdaBN",
                            "MMD (--lam 0.05 --multilevel)", dacs[:-2], dacs_rcs]
        assert {row(section(table, title), r)[1] for r in ("MMD", dacs, dacs_rcs)} == {str(seeds)}
    # phase 1 (2 + 2 + 1 seeds, source-only and oracle), AdaBN, three controls, MMD and both DACS of each, the
    # other four methods, the best method's second seed, AdaBN on each --bn mixed control
    assert len(fake_runs) == 10 + 5 * 7 + 4 + 1 + 5
    # a second invocation finds every run finished; a changed setting runs again (where --resume would refuse)
    del fake_runs[:]
    assert call(*common, "--epochs2", "3").returncode == 0
    assert fake_runs == []
    assert call(*common, "--epochs2", "4").returncode == 0
    assert fake_runs and all(c[0] == "train_mmd.py" or "control_bnmixed_seed" in c[2] for c in fake_runs)


def test_a_best_method_that_runs_on_every_seed_anyway_adds_no_run(fake_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(EFFECTS, "--dacs", 0.2)
    r = call("bench_adapt.py", "--out", tmp_path, "--seeds", "0", "1", "--num-source", "20", "--num-target", "20")
    assert r.returncode == 0, r.stderr
    dacs = row(section((tmp_path / "results.md").read_text(), "DeepLabV3"), "DACS self-training (--dacs 1), rare")
    assert "chosen with target labels" in dacs[0] and dacs[1] == "2" and dacs[4] == "+0.2100"
    assert len(fake_runs) == 10 + 5 * 7 + 4 + 5  # no second seed of another method


def test_one_seed_tables_have_no_spread(fake_runs, tmp_path):
    r = call("bench_adapt.py", "--out", tmp_path, "--seeds", "2", "--epochs2", "2", "--num-source", "20",
             "--num-target", "20")
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "results.md").read_text()
    assert "seed 2." in table and "±" not in table
    assert re.search(r"\| FDA \(--fda 0\.05\) \(.*chosen with target labels\) \| 1 \| 0\.7000 \| 0\.3040 \|", table)


PROBE = """import json, os, signal, sys, time
out, seconds, code = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
started, signals = time.time(), []
def stop(signum, frame):  # as the training scripts: save, then end with 128 + the signal
    signals.append(signum)
    time.sleep(0.3)
    open(out + ".json", "w").write(json.dumps([os.environ.get("OMP_NUM_THREADS"), started, time.time(), signals]))
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
print("probe", seconds, flush=True)
time.sleep(seconds)
open(out + ".json", "w").write(json.dumps([os.environ.get("OMP_NUM_THREADS"), started, time.time(), signals]))
sys.exit(code)
"""


@pytest.fixture
def probe(tmp_path):
    """A stand-in for a training command: --out OUT, seconds to run, exit status; writes OUT.json."""
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return lambda name, seconds, code=0: [str(path), "--out", str(tmp_path / name), str(seconds), str(code)]


@pytest.mark.slow
def test_runs_go_jobs_at_a_time_with_a_share_of_the_threads_and_stop_at_a_failure(probe, tmp_path, capfd):
    bench_adapt.run([probe("a", 1), probe("b", 1.5), probe("c", 0.1)], jobs=2)
    (ta, a0, a1, _), (tb, b0, b1, _), (tc, c0, c1, _) = (json.loads((tmp_path / f"{n}.json").read_text())
                                                         for n in "abc")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS: no affinity
    assert ta == tb == tc == str(max(1, cores // 2))
    assert a0 < b1 and b0 < a1, "a and b ran one after the other"
    assert c0 >= a1 - 0.05, "c started before a slot was free"
    assert (tmp_path / "b.log").read_text() == "probe 1.5\n"
    # a failure: its log's tail and one line naming the log; the run in progress ends, no other starts
    capfd.readouterr()
    with pytest.raises(bench_adapt.UserError, match=re.escape(f"exit 3; log: {tmp_path / 'd.log'}")):
        bench_adapt.run([probe("d", 0.3, 3), probe("e", 1.5), probe("f", 0.1)], jobs=2)
    assert "probe 0.3\n" in capfd.readouterr().out
    assert (tmp_path / "e.json").exists() and not (tmp_path / "f.json").exists()
    # one at a time: the run's output is this process's, its threads as the user set them
    bench_adapt.run([probe("j", 0.1)], jobs=1)
    assert "probe 0.1\n" in capfd.readouterr().out and not (tmp_path / "j.log").exists()
    assert json.loads((tmp_path / "j.json").read_text())[0] == os.environ.get("OMP_NUM_THREADS")


@pytest.mark.slow
def test_an_interrupted_benchmark_lets_each_run_save_before_it_ends(probe, tmp_path):
    """The terminal's Ctrl-C (here SIGINT to the benchmark alone) reaches each run once: a second would end it
    before its checkpoint."""
    code = f"import sys; sys.path.insert(0, {str(bench_adapt.REPO)!r}); import bench_adapt, utils; " \
           f"utils.run_main(lambda: bench_adapt.run({[probe('g', 30), probe('h', 30), probe('i', 0.1)]!r}, 2))"
    bench = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all((tmp_path / f"{n}.log").exists() for n in "gh") and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # the probes set their handlers
    bench.send_signal(signal.SIGINT)
    _, err = bench.communicate(timeout=60)
    assert bench.returncode == 130 and "stopping 2 run(s)" in err, err
    for name in "gh":
        _, started, ended, signals = json.loads((tmp_path / f"{name}.json").read_text())
        assert signals == [signal.SIGINT] and ended - started < 20
    assert not (tmp_path / "i.log").exists()


def test_no_jobs_is_one_line(tmp_path):
    r = call("bench_adapt.py", "--out", tmp_path, "--jobs", "0")
    assert r.returncode == 2 and r.stderr.strip() == "error: --jobs 0: give 1 or more training runs at a time"
    assert not any(tmp_path.iterdir())


def test_a_pair_or_a_phase1_of_other_settings_is_refused(fake_runs, tmp_path):
    """Every row of a table must come from one pair and one source-only model per seed."""
    common = ["bench_adapt.py", "--out", tmp_path, "--seeds", "0", "--epochs2", "2", "--num-source", "20"]
    assert call(*common, "--num-target", "20").returncode == 0
    r = call(*common, "--num-target", "30")
    assert r.returncode == 2 and "holds a pair of 20 + 20 images, not 20 + 30" in r.stderr, r.stderr
    r = call(*common, "--num-target", "20", "--epochs1", "16")
    assert r.returncode == 2 and "source_only_seed0: would train on" in r.stderr and "run(s) started from it" in r.stderr
