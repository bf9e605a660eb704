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
from bench_adapt import output_of
from conftest import call

# target val mIoU each method at each weight, and each --bn mode of the control, adds to the control's 0.20 (plus
# 0.002 a seed); source only scores 0.20 on target val, AdaBN 0.30, the oracle 0.50. Target test is val + TEST_SHIFT
# (or, scrambled, anything): no choice may read it
EFFECTS = {("--lam", "0.001"): 0.0, ("--lam", "0.01"): 0.03, ("--lam", "0.1"): 0.12,  # MMD the sweep's best
           ("--ent", "0.0001"): 0.0, ("--ent", "0.001"): 0.01, ("--ent", "0.01"): -0.02,
           ("--adv", "0.0001"): 0.02, ("--adv", "0.001"): 0.0, ("--adv", "0.01"): -0.01,
           ("--fda", "0.01"): 0.04, ("--fda", "0.05"): 0.08, ("--fda", "0.09"): 0.06,
           ("--dacs", "0.1"): 0.02, ("--dacs", "1"): 0.07, ("--dacs", "10"): -0.05,
           ("--aug", None): 0.03, ("--bn", "frozen"): -0.01, ("--bn", "mixed"): -0.10}
TEST_SHIFT = 0.01


def fake_target_val(cmd):
    """0.20 + the effect, which grows by a tenth a seed (so that paired differences vary), + 0.002 a seed."""
    seed = int(cmd[cmd.index("--seed") + 1])
    effect = sum(e for (flag, value), e in EFFECTS.items()
                 if flag in cmd and (value is None or cmd[cmd.index(flag) + 1] == value))
    return 0.20 + effect * (1 + 0.1 * seed) + 0.002 * seed


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace bench_adapt.run by a writer of args.json and metrics.csv (evaluate.py: its JSON); returns the
    commands it got. calls.test(run folder, val) gives an evaluation's test score (default: val + TEST_SHIFT)."""
    calls = Calls()

    def fake(cmds, jobs):
        # the commands of one call may run at once: none may start from a model that another of them trains
        outs = {Path(c[c.index("--out") + 1]) for c in cmds if "--out" in c}
        for c in cmds:
            for flag in ("--init", "--checkpoint"):
                assert flag not in c or Path(c[c.index(flag) + 1]).parent not in outs, c
                assert flag not in c or (Path(c[c.index(flag) + 1]).parent / "metrics.csv").exists(), c
        for cmd in cmds:
            write(cmd)

    def write(cmd):
        calls.append(cmd)
        if cmd[0] == "evaluate.py":
            checkpoint = Path(cmd[cmd.index("--checkpoint") + 1])
            split = cmd[cmd.index("--split") + 1]
            if checkpoint.name == "best.pt":  # the source-only model, alone or with AdaBN
                val = 0.30 if "--adabn" in cmd else 0.20
            else:
                last = (checkpoint.parent / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
                val = float(last[-1])
            miou = val if split == "val" else calls.test(checkpoint.parent, val)
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"miou": miou}))
            return
        out, epochs = Path(cmd[cmd.index("--out") + 1]), int(cmd[cmd.index("--epochs") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({"argv": cmd}))
        if cmd[0] == "train_seg.py":
            (out / "best.pt").write_text("")
            (out / "last.pt").write_text("")
            # the oracle's val rises by 0.01 an epoch up to epoch 30, then stays at 0.50
            lines = ["epoch,val_miou"] + [f"{e},{0.50 - 0.01 * max(0, 30 - e) if '--train-on' in cmd else 0.60}"
                                          for e in range(1, epochs + 1)]
        else:
            (out / "last.pt").write_text("")
            lines = ["epoch,source_val_miou,target_val_miou", "0,0.6,0.2"]
            lines += [f"{e},0.7,{fake_target_val(cmd) if e == epochs else 0.1}" for e in range(1, epochs + 1)]
        (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(bench_adapt, "run", fake)
    calls.test = lambda run, val: val + TEST_SHIFT
    return calls


class Calls(list):
    """The commands run, and how a fake evaluation scores target test."""


def row(table, label):
    """The cells of the row that starts with label."""
    line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def section(table, title):
    return table.split(f"### {title}\n")[1].split("###")[0]


def test_the_sweep_picks_on_val_the_table_reports_test_paired_with_the_control(fake_runs, tmp_path):
    common = ["bench_adapt.py", "--out", tmp_path, "--seeds", "1", "2", "3", "--num-source", "20", "--num-target", "20"]
    r = call(*common, "--epochs2", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "gta5" / "split.mat").exists()  # its own pair
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["picks"] == {"mmd": "0.1", "ent": "0.001", "adv": "0.0001", "fda": "0.05", "dacs": "1", "aug": None}
    # MMD, and the two other methods the sweep ranks first (MMD's own val, the highest, is not in that ranking)
    assert results["every_seed"] == ["mmd", "fda", "dacs"]
    table = (tmp_path / "results.md").read_text()
    sweep = table.split("### The sweep")[1].split("###")[0]  # target val of seed 0: 0.20 + each weight's effect
    assert row(sweep, "FDA (--fda 0.05)")[1:] == ["0.01: 0.2400", "**0.05: 0.2800**", "0.09: 0.2600"]
    assert row(sweep, "augmentation (--aug)")[1:] == ["0.2300", "", ""]
    deeplab = section(table, "DeepLabV3")
    # the baselines on test (val + 0.01): source only 0.21, AdaBN 0.31, the oracle 0.51; AdaBN, better on val, is b
    assert row(deeplab, "source only (phase 1)")[2:6] == ["1, 2, 3", "0.6000 ± 0.0000", "0.2000 ± 0.0000",
                                                          "0.2100 ± 0.0000"]
    # the oracle trains twice as long as phases 1 and 2 (2 (15 + 3) = 36 epochs); its val over the 5 epochs up to
    # 18 (14-18: 0.50 - 0.01 (16 + 15 + 14 + 13 + 12) / 5), up to 31 (27-31: 0.50 - 0.01 (3 + 2 + 1) / 5) and to 36
    assert ("up to epoch 18 0.3600, up to epoch 31 0.4880, up to epoch 36 0.5000 — still rising at its end" in
            section(table, "DeepLabV3"))
    assert row(deeplab, "target oracle (36 epochs")[5] == "0.5100 ± 0.0000" and row(deeplab, "target oracle")[7] == "100%"
    assert results["models"]["deeplab"]["floor"] == "adabn"
    assert "Gap closed from source only + AdaBN (the better of the two" in section(table, "DeepLabV3")
    # the control: 0.20 + 0.002 a seed; FDA's test differences 0.08 · (1 + 0.1 s) for s = 1, 2, 3: 0.088, 0.096, 0.104,
    # mean 0.096, sd 0.008, half-width t(0.975, 2) · 0.008 / sqrt(3) = 4.303 · 0.0046188 = 0.019875
    assert row(deeplab, "control (lam 0)")[2:6] == ["1, 2, 3", "0.7000 ± 0.0000", "0.2040 ± 0.0020", "0.2140 ± 0.0020"]
    fda = row(deeplab, "FDA (--fda 0.05)")
    assert fda[1:3] == ["0.05", "1, 2, 3"] and fda[6] == "+0.0960 [+0.0761, +0.1159], won 3/3"
    # gap closed seed by seed: (0.20 + 0.088 + 0.002 + 0.01 - 0.31) / 0.2 = -5%, then 0%, +5%: a mean of 0%
    assert fda[7] == "0%"
    assert row(deeplab, "MMD (--lam 0.1 --multilevel)")[2] == "1, 2, 3"
    ent = row(deeplab, "entropy minimisation (--ent 0.001)")
    assert ent[2] == "0" and ent[6] == "+0.0100, won 1/1"  # a row only the sweep ran: its seed, paired with that seed's
    assert ent[7] == f"{(0.20 + 0.01 + 0.01 - 0.31) / 0.2:.0%}"  # control, gap from that seed's AdaBN and oracle
    assert row(deeplab, "control, --bn mixed")[2] == "0" and row(deeplab, "control, --bn mixed")[6] == "-0.1000, won 0/1"
    # the rows run on every seed against each other: MMD - FDA differ by 0.04 (1 + 0.1 s) = 0.044, 0.048, 0.052 (mean
    # 0.048, sd 0.004, half-width 4.303 · 0.004 / sqrt(3) = 0.009937); FDA - DACS by 0.011, 0.012, 0.013 (0.002484)
    assert row(deeplab, "MMD (--lam 0.1 --multilevel) − FDA")[1] == "+0.0480 [+0.0381, +0.0579], won 3/3"
    assert row(deeplab, "FDA (--fda 0.05) − DACS")[1] == "+0.0120 [+0.0095, +0.0145], won 3/3"
    assert row(deeplab, "MMD (--lam 0.1 --multilevel) − DACS")[1] == "+0.0600 [+0.0476, +0.0724], won 3/3"
    assert len(results["models"]["deeplab"]["between"]) == 3 and results["models"]["unet"]["between"] == {}
    for title in ("U-Net", "DeepLabV3+"):
        names = [line.split("|")[1].strip() for line in section(table, title).splitlines() if line.startswith("| ")]
        assert names[1:] == ["source only (phase 1)", "source only + AdaBN", "target oracle (36 epochs on target labels)",
                             "control (lam 0), --bn domain (default)", "control, --bn frozen", "control, --bn mixed",
                             "MMD (--lam 0.1 --multilevel)", "FDA (--fda 0.05)", "DACS self-training (--dacs 1)"]
        assert {row(section(table, title), r)[2] for r in ("MMD", "FDA", "DACS", "control, --bn")} == {"1"}
    # phase 1 (source only, the oracle) and its 5 evaluations for DeepLabV3's seeds 0-3 and the others' seed 1;
    # phase 2: the controls (3 --bn modes on one seed of each model, the default on DeepLabV3's other seeds), 16
    # sweep runs, the 3 picked methods on 3 DeepLabV3 seeds and on 2 other models; a test score of each
    phase2 = (3 + 3) + 2 * 3 + 16 + 3 * 3 + 2 * 3
    assert len(fake_runs) == 2 * 6 + 5 * 6 + phase2 * 2
    # a test score for every run (phase 1's too) and for AdaBN on each source-only model
    scored = {(p.parent.name, p.name[:-len(".test.json")]) for p in tmp_path.glob("*/*.test.json")}
    trained = {(p.parent.parent.name, p.parent.name) for p in tmp_path.glob("*/*/metrics.csv")}
    assert scored == trained | {(m, n.replace("source_only", "adabn")) for m, n in trained if n.startswith("source")}
    # a second invocation finds every run finished; more epochs train on (the oracle's follow phase 2's)
    del fake_runs[:]
    assert call(*common, "--epochs2", "3").returncode == 0
    assert fake_runs == []
    assert call(*common, "--epochs2", "4").returncode == 0
    assert len(fake_runs) == phase2 * 2 + 6 * 2
    assert all(c[0] == "train_mmd.py" or "--train-on" in c or "/last.pt" in c[2] for c in fake_runs)
    # fewer epochs than a run has: refused (a resume would train nothing, and the table would name the wrong length)
    r = call(*common, "--epochs2", "2")
    assert r.returncode == 2 and "oracle_seed0: trained 38 epochs already, more than the 34 asked for" in r.stderr


def test_no_choice_reads_the_test_split(fake_runs, tmp_path):
    """Two benchmarks whose target test labels differ make the same choices: the same picks, the same rows on every
    seed, the same commands, the same baseline for gap closed. The second's test scores are scrambled: 1 - val puts
    every row in the opposite order on test, so a choice that read them would come out otherwise."""
    runs = []
    for name, test in (("a", lambda run, val: val + TEST_SHIFT), ("b", lambda run, val: 1 - val)):
        fake_runs.test = test
        del fake_runs[:]
        r = call("bench_adapt.py", "--out", tmp_path / name, "--seeds", "1", "2", "--num-source", "20", "--num-target",
                 "20", "--epochs2", "2")
        assert r.returncode == 0, r.stderr
        results = json.loads((tmp_path / name / "results.json").read_text())
        commands = [[str(a).replace(str(tmp_path / name), "OUT") for a in c] for c in fake_runs]
        floors = {m: results["models"][m]["floor"] for m in results["models"]}
        runs.append((results["picks"], results["every_seed"], commands, floors))
    assert runs[0] == runs[1]
    tests = json.loads((tmp_path / "b" / "results.json").read_text())["models"]["deeplab"]["rows"]["fda0.05"]["test"]
    assert tests and all(v > 0.5 for v in tests.values())  # the scrambled scores did reach the table


def test_paired_differences_and_their_interval_by_hand():
    """Differences 0.01, 0.03, 0.02, 0.04, 0.00: mean 0.02, sample sd sqrt(0.001 / 4) = 0.0158114, half-width
    t(0.975, 4) · sd / sqrt(5) = 2.776 · 0.0070711 = 0.0196293; 4 of 5 won (0.00 is not a win)."""
    control = {s: 0.5 for s in range(5)}
    method = {0: 0.51, 1: 0.53, 2: 0.52, 3: 0.54, 4: 0.50, 7: 0.9}  # seed 7 has no control: left out
    mean, half, wins, n = bench_adapt.paired(method, control)
    assert mean == pytest.approx(0.02) and half == pytest.approx(0.0196293, abs=1e-6) and (wins, n) == (4, 5)
    assert bench_adapt.paired_text((mean, half, wins, n)) == "+0.0200 [+0.0004, +0.0396], won 4/5"
    assert bench_adapt.paired({0: 0.4}, {0: 0.5})[1:] == (None, 0, 1)  # one seed: no interval
    assert bench_adapt.T_975[1] == 4.303 and bench_adapt.T_975[3] == 2.776  # 2 and 4 degrees of freedom


def test_one_seed_tables_have_no_spread_and_the_sweep_seed_stays_out_of_the_main_seeds(fake_runs, tmp_path):
    r = call("bench_adapt.py", "--out", tmp_path, "--seeds", "2", "--epochs2", "2", "--num-source", "20",
             "--num-target", "20")
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "results.md").read_text()
    data = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line and "| run |" not in line]
    assert "Main rows: seeds 2;" in table and data
    assert not [line for line in data if "±" in line or " [+" in line or " [-" in line]
    # --oracle-epochs 40: the oracle's val over epochs 31-35 and 36-40 is 0.50: it no longer rises
    r = call("bench_adapt.py", "--out", tmp_path / "y", "--seeds", "2", "--epochs2", "2", "--num-source", "20",
             "--num-target", "20", "--oracle-epochs", "40")
    assert r.returncode == 0, r.stderr
    assert "up to epoch 17 0.3500, up to epoch 35 0.5000, up to epoch 40 0.5000 — no longer rising" in (
        tmp_path / "y" / "results.md").read_text()
    r = call("bench_adapt.py", "--out", tmp_path / "x", "--seeds", "0", "1")
    assert r.returncode == 2 and "--sweep-seed 0: also in --seeds" in r.stderr


def test_results_kept_without_checkpoints_are_not_run_again(fake_runs, tmp_path):
    """A benchmark goes on in another session from its numbers alone (results/ keeps args.json, metrics.csv and the
    scores, not the checkpoints): nothing finished runs again, new seeds run, and a run that would start from a
    checkpoint that is gone is refused in one line. --models deeplab runs DeepLabV3 alone."""
    common = ["bench_adapt.py", "--out", tmp_path, "--num-source", "20", "--num-target", "20", "--epochs2", "2",
              "--models", "deeplab"]
    assert call(*common, "--seeds", "1").returncode == 0
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"data", "deeplab"}
    for p in tmp_path.glob("deeplab/*/*.pt"):
        p.unlink()
    del fake_runs[:]
    assert call(*common, "--seeds", "1").returncode == 0 and fake_runs == []
    assert call(*common, "--seeds", "1", "2").returncode == 0
    assert fake_runs and all(re.search(r"_seed2\b", output_of(c)) for c in fake_runs), fake_runs
    for p in (tmp_path / "deeplab" / "control_seed1").iterdir():
        p.unlink()
    r = call(*common, "--seeds", "1", "2")
    assert r.returncode == 2 and "source_only_seed1/best.pt: gone" in r.stderr and "control_seed1" in r.stderr
    assert "move all of" in r.stderr and "_seed1* away" in r.stderr
    for p in (tmp_path / "deeplab").glob("*_seed1*"):  # what the line says to do: seed 1 runs again, from scratch
        p.rename(tmp_path / p.name)
    del fake_runs[:]
    assert call(*common, "--seeds", "1", "2").returncode == 0
    assert fake_runs and all(re.search(r"_seed1\b", output_of(c)) for c in fake_runs), fake_runs
    r = call(*common[:-1], "unet")
    assert r.returncode == 2 and "--models: DeepLabV3 (deeplab) must be one" in r.stderr


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
    common = ["bench_adapt.py", "--out", tmp_path, "--seeds", "1", "--epochs2", "2", "--num-source", "20"]
    assert call(*common, "--num-target", "20").returncode == 0
    r = call(*common, "--num-target", "30")
    assert r.returncode == 2 and re.search(r"holds pair 2 \(look [0-9.]+\), 20 \+ 20 images, not pair 2 \(look [0-9.]+\), "
                                           r"20 \+ 30 images; use another --out", r.stderr), r.stderr
    r = call(*common, "--num-target", "20", "--pair", "1")
    assert r.returncode == 2 and re.search(r"holds pair 2 \(look [0-9.]+\), 20 \+ 20 images, not pair 1, 20", r.stderr)
    record = tmp_path / "pair.json"
    made = record.read_text()
    record.unlink()  # a folder made before there were two pairs kept data/pair.json, and only pair 1
    (tmp_path / "data" / "pair.json").write_text(json.dumps({"num_source": 20, "num_target": 20}))
    r = call(*common, "--num-target", "20")
    assert r.returncode == 2 and "holds pair 1, 20 + 20 images, not pair 2" in r.stderr, r.stderr
    (tmp_path / "data" / "pair.json").unlink()
    record.write_text(made)
    # the same pair drawn otherwise (numbers continued on a machine whose numpy or Pillow draws other bytes)
    label = next((tmp_path / "data" / "gta5" / "labels").glob("*.png"))
    kept = label.read_bytes()
    label.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))
    r = call(*common, "--num-target", "20")
    assert r.returncode == 2 and "other bytes than the pair the runs" in r.stderr, r.stderr
    label.write_bytes(kept)
    r = call(*common, "--num-target", "20", "--epochs1", "16")
    assert r.returncode == 2 and "source_only_seed0: would train on" in r.stderr and "run(s) started from it" in r.stderr
