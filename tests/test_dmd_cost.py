"""bench/dmd_cost.py projects the README's cost table from the stored H100 measurements."""
import subprocess
import sys

from launcher import REPO


def test_cost_table_from_stored_measurements():
    out = subprocess.run([sys.executable, "bench/dmd_cost.py", "--steps", "3000", "--gpus", "8", "64"], cwd=REPO,
                         check=True, capture_output=True, text=True, timeout=60).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 8 ") or line.startswith("| 64 ")]
    assert len(rows) == 2
    memory = [float(r[1]) for r in rows]
    low_hours = [float(r[4].split("–")[0]) for r in rows]
    assert memory[0] > memory[1] and memory[0] < 79, "8 GPUs must fit an 80 GB card, 64 need less"
    assert low_hours[1] > low_hours[0], "one sample per GPU: more GPUs, more GPU-hours for the same steps"
