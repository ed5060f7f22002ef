#!/usr/bin/env python3
"""Plot cold sequential read throughput per file from tools/bench_read.py reports (--json): the
mount next to the plain file on local disk, squashfuse and this machine's bound for the file.

    $(bash tools/bench_env.sh) tools/plot_read.py smollm.json minilm.json -o docs/read-throughput.png

Runs in the benchmark environment (matplotlib is not a zipfs dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: (report key, label, colour): what is drawn for each file, in this order
SERIES = [("cold_seq_mount_gbs", "zipfs mount", "#1f77b4"),
          ("bound_gbs", "bound (cores / (FUSE + decode core-s per GB))", "#9ecae1"),
          ("cold_seq_squashfs_gbs", "squashfuse (zstd)", "#ff7f0e"),
          ("cold_seq_raw_gbs", "plain file, local disk", "#7f7f7f")]


#: bench_read's --model values, as the plot names them
MODELS = {"smollm": "SmolLM2-135M BF16, 100-step fine-tune", "minilm": "MiniLM F32, sre fine-tune"}


def label(report: dict) -> str:
    """A file's axis label: which model and file, how big, how many runs."""
    return (f"{MODELS.get(report.get('model', ''), report['file'])}\n"
            f"{report['size_mb']:.0f} MB, median of {report['runs']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/read-throughput.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [json.loads(p.read_text()) for p in args.reports]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    width = 0.8 / len(SERIES)
    for k, (key, name, colour) in enumerate(SERIES):
        xs = [i + (k - (len(SERIES) - 1) / 2) * width for i in range(len(reports))]
        values = [r[key] for r in reports]
        bars = ax.bar(xs, values, width, label=name, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xticks(range(len(reports)), [label(r) for r in reports], fontsize=8)
    ax.set_ylabel("cold sequential read, GB/s")
    ax.set_title(f"Cold sequential 1 MiB reads of a delta-coded fine-tune, {reports[0]['cores']} cores",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.margins(y=0.15)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
