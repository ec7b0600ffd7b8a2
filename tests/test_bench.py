"""The extraction benchmark still runs (tiny models, a handful of utterances); its numbers are not checked."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_extract_bench_runs_and_prints_ratios():
    out = subprocess.run([sys.executable, "bench/extract.py", "--size", "tiny", "--n", "3", "--n-text", "12",
                          "--only", "bert,wavlm"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
            if re.match(r"^(bert|wavlm) ", line)}
    assert set(rows) == {"bert", "wavlm"}
    for cells in rows.values():   # naive, pipeline, speed-up, int8, speed-up, min cos
        assert len(cells) == 6 and cells[2].endswith("x") and cells[4].endswith("x")
        assert 0.9 < float(cells[5]) <= 1.0001
