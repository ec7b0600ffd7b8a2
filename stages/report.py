"""Stage report: one comparison table (markdown + JSON) of every trained head on the same cached features."""
import argparse
import json
import logging
from pathlib import Path

from pipeline.logs import run_stage
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args(argv)
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("*/*/metrics.json"))]
    lines = ["| dataset | head | modalities | dev WF1 | test WF1 | test acc | test mean r | best epoch | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda d, k: f"{d[k]:.4f}" if k in d else "–"  # noqa: E731
    for r in rows:
        dev, test = r.get("dev", {}), r.get("test", {})
        lines.append(f"| {r['dataset']} | {r['head']} | {'+'.join(r['modalities'])} | {fmt(dev, 'wf1')} | "
                     f"{fmt(test, 'wf1')} | {fmt(test, 'accuracy')} | {fmt(test, 'mean_r')} | {r['best_epoch']} | "
                     f"{r['seconds_per_epoch']} |")
    out = Path(args.out)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(rows, indent=1))
    log.info("\n".join(lines))


if __name__ == "__main__":
    run_stage(main)
