"""colab.ipynb, executed headlessly as Colab runs it (its Colab-only steps skip themselves elsewhere), at a tiny
size, twice: the second run of its cells is the next Colab session, which must continue the runs, not redo them."""
import csv
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent


def outputs(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


@pytest.mark.slow
def test_the_colab_notebook_runs_and_running_its_cells_again_continues_the_runs(toy, tmp_path):
    nb = nbformat.read(REPO / "colab.ipynb", as_version=4)
    settings = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Settings"))
    settings.source += (f'\nDATA = "--gta5-root {toy[0]} --cityscapes-root {toy[1]}"\nMODEL = "--model deeplab '
                        f'--size 64x32"\nEPOCHS_1, EPOCHS_2 = 1, 1\nEXTRA = "--amp off --workers 0"\n'
                        f'RUNS_ELSEWHERE = "{tmp_path / "runs"}"\n')
    code = [c for c in nb.cells if c.cell_type == "code"]
    phase1, phase2 = (next(c for c in code if f"python {s}" in c.source) for s in ("train_seg.py", "train_mmd.py"))
    sessions = []
    for _ in range(2):
        done = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
        sessions.append(done.execute())  # a cell that fails raises CellExecutionError with its output
        sessions[-1] = {i: outputs(c) for i, c in enumerate(sessions[-1].cells)}
        with open(tmp_path / "runs" / "mmd" / "metrics.csv") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]  # the second session trained nothing more
    first, second = sessions
    index = {id(c): i for i, c in enumerate(nb.cells)}
    picks = next(i for i, c in enumerate(nb.cells) if "pick_device" in c.source)
    assert "device cpu | precision off" in first[picks] or "device cpu | precision bf16" in first[picks]
    for session in sessions:  # the closing table, then the per-class scores
        table = session[index[id(phase2)]]
        assert "before adaptation" in table and "last epoch (1)" in table and "target val mIoU" in table
    assert "resumed from" in second[index[id(phase1)]] and "resumed from" in second[index[id(phase2)]]
    last = nb.cells[-1]
    assert [o for o in last.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert (tmp_path / "runs" / "predictions.png").stat().st_size > 1000
