"""
Plot dense validation loss of several runs against wall-clock training time and against tokens,
with each run's switch to dense attention marked (dashed) and, during a Lighthouse phase, the
validation loss measured with Lighthouse attention (dotted). Reads the runs' metrics.jsonl files.
Needs matplotlib (optional: pip install matplotlib).

    python plot_runs.py out-dense/metrics.jsonl out-lighthouse/metrics.jsonl      # writes runs.png
    python plot_runs.py assets/runs/h200_a_*.jsonl --out a.png

Unless --labels are given, each run is labelled by its path below the folder that holds all the
runs: out-dense, out-lighthouse (a metrics file with a name of its own by that name: h200_a_dense).
The figure goes into that folder unless --out says where.
"""

import argparse
import json
import os
import sys


def load(path):
    """(the evaluation records, the first dense-phase record or None) of a metrics.jsonl file."""
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found")
    with open(path) as f:
        try:
            records = [json.loads(line) for line in f]
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path} is not a metrics.jsonl file written by train.py ({e})")
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        sys.exit(f"error: {path} has no validation loss records yet")
    # the first dense-phase record marks the switch, if the run had a Lighthouse phase
    lighthouse = any(r["phase"] == "lighthouse" for r in records)
    switch = next((r for r in records if r["phase"] == "dense"), None) if lighthouse else None
    return evals, switch


def run_labels(paths):
    """A label per metrics file: its run folder (or, for a file not named metrics.jsonl, its own
    name without .jsonl), relative to the folder that holds all of them."""
    names = [os.path.dirname(p) if os.path.basename(p) == "metrics.jsonl" else p.removesuffix(".jsonl")
             for p in map(os.path.abspath, paths)]
    common = os.path.commonpath([os.path.dirname(n) for n in names])
    return [os.path.relpath(n, common) for n in names]


def default_out(paths):
    """runs.png in the folder that holds all the runs."""
    return os.path.join(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]), "runs.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files, one per run")
    parser.add_argument("--labels", nargs="+", help="a label per run (default: each run's path below the "
                                                    "folder that holds all the runs)")
    parser.add_argument("--out", help="the figure (default: runs.png in the folder that holds all the runs)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.metrics):
        sys.exit(f"error: give one label per run, got {len(args.labels)} for {len(args.metrics)} runs")
    labels = args.labels or run_labels(args.metrics)
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        sys.exit(f"error: two runs have the label {repeated[0]!r}; give each run once, with labels of its own")
    out = args.out or default_out(args.metrics)
    try:
        import matplotlib
    except ModuleNotFoundError:  # optional: only this script needs it
        sys.exit("plot_runs.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    shown = []  # losses after the first evaluation: the untrained model's would flatten the rest
    for path, label in zip(args.metrics, labels):
        evals, switch = load(path)
        seconds = [r["elapsed_s"] for r in evals]
        tokens = [r["tokens"] / 1e6 for r in evals]
        loss = [r["val_loss"] for r in evals]
        shown += [r["val_loss"] for r in evals if r["iter"] > 0]
        line, = by_time.plot(seconds, loss, marker=".", label=label)
        by_tokens.plot(tokens, loss, marker=".", color=line.get_color(), label=label)
        # the same model measured with Lighthouse attention, during the Lighthouse phase
        lighthouse_evals = [r for r in evals if "val_loss_lighthouse" in r]
        if lighthouse_evals:
            lighthouse_loss = [r["val_loss_lighthouse"] for r in lighthouse_evals]
            by_time.plot([r["elapsed_s"] for r in lighthouse_evals], lighthouse_loss, ":", color=line.get_color())
            by_tokens.plot([r["tokens"] / 1e6 for r in lighthouse_evals], lighthouse_loss, ":",
                           color=line.get_color(), label=f"{label}, Lighthouse-mode")
        if switch is not None:
            # the switch happens at the start of the first dense step: the last eval before it
            at = max((r for r in evals if r["tokens"] <= switch["tokens"] - 1), key=lambda r: r["tokens"])
            by_time.axvline(at["elapsed_s"], color=line.get_color(), linestyle="--", linewidth=1)
            by_tokens.axvline(at["tokens"] / 1e6, color=line.get_color(), linestyle="--", linewidth=1)
    if shown:
        by_time.set_ylim(min(shown) - 0.05, max(shown) + 0.1)
    by_time.set_xlabel("training wall-clock seconds (eval excluded)")
    by_tokens.set_xlabel("training tokens (millions)")
    by_time.set_ylabel("validation loss (dense attention)")
    for ax in (by_time, by_tokens):
        ax.grid(alpha=0.3)
    by_tokens.legend(title="dashed: switch to dense", fontsize=8, title_fontsize=8, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
