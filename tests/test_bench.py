"""The benchmarks still run (tiny models or sizes, a handful of utterances); their numbers are not checked."""
import json
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


def test_scale_bench_runs_every_stage_and_reports_ratios(tmp_path):
    """bench/scale.py on a 3-dialogue sample (each stage through `dvc repro --single-item`, as a user runs it),
    with the read throughput and the re-run after a param edit; the ratio table from made-up rows of two sizes."""
    sys.path.append(str(ROOT / "bench"))   # last: a bench module must never shadow a package
    import scale

    out = subprocess.run([sys.executable, "bench/scale.py", "--dialogues", "3", "--epochs", "1",
                          "--json", str(tmp_path / "rows.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "rows.json").read_text())
    rows = got["stages"]
    assert [r["stage"] for r in rows] == ["check", "make_sample", "prepare", "decode", "extract:text_minilm",
                                          "extract:audio_egemaps", "extract:visual_c3d", "inputs:fusion_mlp",
                                          "train:fusion_mlp", "report"]
    for r in rows:
        assert r["utterances"] > 0 and r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["max_rss"] > 2 ** 20, r
    assert all(r["output_bytes"] > 0 for r in rows if r["stage"].startswith(("make", "decode", "extract", "train")))
    reads = {(r["store"], r["what"]) for r in got["reads"]}
    assert {("text_minilm.h5", "seq (row by row)"), ("text_minilm.h5", "seq (sequences)")} <= reads and ("visual_c3d.h5", "pooled") in reads
    assert got["edit"]["param"] == "heads.fusion_mlp.options.dropout" and 0 < got["edit"]["fraction"] < 1
    assert "extract:visual_c3d" in out.stdout and "dvc repro after editing" in out.stdout
    two = [dict(r, dialogues=3) for r in rows[1:3]] + [dict(r, dialogues=30, utterances=r["utterances"] * 10,
                                                            seconds=r["seconds"] * 20, max_rss=r["max_rss"] * 3,
                                                            cpu_seconds=r["cpu_seconds"] * 5) for r in rows[1:3]]
    table = scale.report(two).splitlines()
    assert "10.0x the utterances" in table[table.index("") + 1], table
    ratios = {line.split()[0]: line.split()[1:] for line in table[table.index("") + 3:]}
    assert ratios["make_sample"][:2] == ["2.00", "0.50"] and ratios["make_sample"][2] == "3.00", table
    assert set(ratios) == {"make_sample", "prepare"}, table
