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

# target val mIoU each method adds to the control's 0.20 (the combination: their sum); the oracle scores 0.50
EFFECTS = {"--lam": 0.05, "--pseudo": 0.10, "--ent": -0.01, "--fda": 0.02, "--adv": 0.0, "--aug": 0.03}


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace bench_adapt.run by a writer of args.json and metrics.csv; returns the commands it got."""
    calls = []

    def fake(cmds, jobs):
        # the runs of one call may run at once: none may start from a model that another of them trains
        assert all((Path(c[c.index("--init") + 1]).parent / "metrics.csv").exists() for c in cmds if "--init" in c)
        for cmd in cmds:
            write(cmd)

    def write(cmd):
        calls.append(cmd)
        out, epochs = Path(cmd[cmd.index("--out") + 1]), int(cmd[cmd.index("--epochs") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({"argv": cmd}))
        if cmd[0] == "train_seg.py":
            lines = ["epoch,val_miou"] + [f"{e},{0.50 if '--train-on' in cmd else 0.60}" for e in range(1, epochs + 1)]
        else:
            seed = int(cmd[cmd.index("--seed") + 1])
            on = [f for f in EFFECTS if f in cmd and (f != "--lam" or cmd[cmd.index(f) + 1] != "0")]
            target = 0.20 + sum(EFFECTS[f] for f in on) + 0.002 * seed
            lines = ["epoch,source_val_miou,target_val_miou", "0,0.6,0.2"]
            lines += [f"{e},0.7,{target if e == epochs else 0.1}" for e in range(1, epochs + 1)]
        (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(bench_adapt, "run", fake)
    return calls


def row(table, label):
    return next(line for line in table.splitlines() if line.startswith(f"| {label}")).split(" | ")


def test_rows_combination_and_best_row(fake_runs, tmp_path):
    r = call("bench_adapt.py", "--out", tmp_path, "--seeds", "0", "1", "--epochs2", "3")
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "results.md").read_text()
    # seeds 0 and 1 add 0 and 0.002: the means are the effects + 0.001
    control = row(table, "control (lam 0)")
    assert control[2] == "0.2010 ± 0.0014" and control[3] == "+0.0000" and control[4] == "0% |"
    st = row(table, "self-training")
    assert st[1] == "0.7000 ± 0.0000" and st[3] == "+0.1000" and st[4] == f"{(0.301 - 0.2) / 0.3:.0%} |"
    assert row(table, "entropy")[3] == "-0.0100"
    # mmd, pseudo, fda and aug beat the control (adv only equals it): together they add 0.20
    together = row(table, "together: mmd + pseudo + fda + aug")
    assert together[3] == "+0.2000" and together[4] == f"{(0.401 - 0.2) / 0.3:.0%} |"
    assert (tmp_path / "deeplab" / "combo_mmd+pseudo+fda+aug_seed1" / "metrics.csv").exists()
    # the subset models: control, MMD and DeepLabV3's best row, the combination
    for model in ("deeplabv3plus", "unet"):
        assert sorted(p.name for p in (tmp_path / model).iterdir()) == sorted(
            ["source_only", "oracle"] + [f"{n}_seed{s}" for n in ("control", "mmd", "combo_mmd+pseudo+fda+aug")
                                         for s in (0, 1)])
    assert table.count("(DeepLabV3's best row)") == 2
    assert len(fake_runs) == 6 + 2 * 8 + 2 * 3 * 2  # phase 1, DeepLabV3's rows, the subset models'
    # a second invocation finds every run finished; a changed setting runs again (where --resume would refuse)
    del fake_runs[:]
    assert call("bench_adapt.py", "--out", tmp_path, "--seeds", "0", "1", "--epochs2", "3").returncode == 0
    assert fake_runs == []
    assert call("bench_adapt.py", "--out", tmp_path, "--seeds", "0", "1", "--epochs2", "4").returncode == 0
    assert fake_runs and all(c[0] == "train_mmd.py" for c in fake_runs)


def test_no_combination_when_fewer_than_two_methods_help(fake_runs, tmp_path, monkeypatch):
    for flag, effect in (("--lam", -0.01), ("--fda", 0.0), ("--aug", 0.0)):
        monkeypatch.setitem(EFFECTS, flag, effect)
    r = call("bench_adapt.py", "--out", tmp_path, "--seeds", "2", "--epochs2", "2")
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "results.md").read_text()
    assert "Only pseudo beat the control: no combination to run." in table and "together" not in table
    assert "seed 2." in table and "±" not in table
    assert re.search(r"\| self-training .*\(DeepLabV3's best row\) \| 0\.7000 \| 0\.3040 \|", table)


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
