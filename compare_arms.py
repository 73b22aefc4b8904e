"""
Compare arms of an experiment, each trained with several seeds: mean ± standard deviation over
the seeds of what train.py logged (metrics.jsonl) and eval_long.py measured (eval_long.json), as a
markdown table, and, if matplotlib is installed, a figure.

    python compare_arms.py dense=runs/dense_s* norm=runs/norm_s* --baseline dense --out assets/arms.png

Each run folder holds metrics.jsonl and eval_long.json (python eval_long.py RUN/ckpt.pt --out
RUN/eval_long.json), which records the seed the run was trained with. Runs of different arms with
the same seed started from the same weights and saw the same data: they are compared in pairs.
Each arm needs one run per seed. Columns:
  final val loss     the dense validation loss at the end (train.py's last evaluation)
  vs baseline        paired: the run's final loss minus the same-seed baseline run's, mean ± std
                     over the seeds; "result" when |mean| > 2 standard errors, else "not resolved"
  at equal time      paired: the run's final loss minus the same-seed baseline run's loss at the
                     run's train s (interpolated between the baseline's evaluations); negative:
                     better per second
  at switch          the Lighthouse-mode validation loss at the end of the Lighthouse phase (with
                     the paper's selection it reads ahead: see probe_lookahead.py)
  switch spike       at the switch, the same weights' dense-mode minus Lighthouse-mode validation
                     loss: what switching to dense attention costs at once
  last T loss        eval_long: the loss of each window's last T tokens (1024, or half of a shorter
                     window), given the whole window
  far context        eval_long: how much worse the last T tokens are given only the last T
  copy acc @ D       eval_long: accuracy on the second copy of a passage at the largest distance D
  tok/s per phase    the median over each phase's log lines, its first left out (it holds the
                     compile): the context-length warmup (short), Lighthouse, dense
  train s            training seconds, evaluations excluded, compilation included
  steady s           the time the run's tokens take at its phase rates: train s without compilation
  speed-up           the baseline arm's mean steady s over this arm's
"""

import argparse
import glob
import json
import math
import os
import statistics
import sys


def read_run(folder):
    """The numbers of one run folder (see the module docstring)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "val_loss" in r]
    logs = [r for r in records if "train_loss" in r]
    with open(os.path.join(folder, "eval_long.json")) as f:
        entry = json.load(f)["checkpoints"][0]
    run = dict(folder=folder, seed=entry.get("train_seed"), final=evals[-1]["val_loss"], train_s=logs[-1]["elapsed_s"],
               curve=[(r["elapsed_s"], r["tokens"], r["val_loss"]) for r in evals], rate={}, steady_s=0.0,
               at_switch=None, spike=None)
    if any(r["phase"] == "lighthouse" for r in logs):
        switch = [r for r in evals if "val_loss_lighthouse" in r][-1]  # the last Lighthouse-phase evaluation
        run["at_switch"], run["spike"] = switch["val_loss_lighthouse"], switch["val_loss"] - switch["val_loss_lighthouse"]
    before = 0  # the tokens of the phases before this one (each phase's last iteration is logged)
    for phase in ("short", "lighthouse", "dense"):  # in the order a run goes through them
        in_phase = [r for r in logs if r["phase"] == phase]
        if in_phase:
            run["rate"][phase] = statistics.median([r["tok_per_s"] for r in in_phase][1:] or [in_phase[0]["tok_per_s"]])
            run["steady_s"] += (in_phase[-1]["tokens"] - before) / run["rate"][phase]
            before = in_phase[-1]["tokens"]
    context = entry["context"]
    # (eval_long.json files written before windows under 2048 tokens had a far-context measurement have none)
    run.update(tail=context["tail"], last_tail=context["loss_full"], far_context=(context["gain"] or [None])[0],
               copy_distance=entry["copy"]["distances"][-1], copy_accuracy=entry["copy"]["accuracy_second"][-1],
               copy_gain=entry["copy"]["gain"], distances=entry["copy"]["distances"],
               position_bins=entry["position"]["bins"], position_loss=entry["position"]["loss"])
    return run


def loss_at(curve, seconds):
    """A run's validation loss at a training time, linearly between its evaluations."""
    for (s0, _, l0), (s1, _, l1) in zip(curve, curve[1:]):
        if s0 <= seconds <= s1:
            return l0 + (l1 - l0) * (seconds - s0) / (s1 - s0)
    return curve[-1][2] if seconds > curve[-1][0] else curve[0][2]


def paired(differences):
    """Per-seed differences from the baseline: mean ± std, and whether the mean is a result."""
    if not differences:
        return "–"
    if len(differences) < 2:
        return f"{differences[0]:+.3f} (1 seed)"
    mean, std = statistics.mean(differences), statistics.stdev(differences)
    verdict = "result" if abs(mean) > 2 * std / math.sqrt(len(differences)) else "not resolved"
    return f"{mean:+.3f} ± {std:.3f} ({verdict})"


def mean_std(values, digits=3):
    if not values or None in values:
        return "–"
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(arms, baseline):
    base = arms[baseline]
    base_steady = statistics.mean(r["steady_s"] for r in base.values())
    tail = next(iter(base.values()))["tail"]
    rows = [f"| arm | seeds | final val loss | vs {baseline} | at equal time | at switch | switch spike | last {tail} loss "
            "| far context | copy acc @ D | tok/s short / Lighthouse / dense | train s | steady s | speed-up |",
            "|" + "---|" * 14]
    for name, runs in arms.items():
        seeds = sorted(runs)
        values = lambda key: [runs[s][key] for s in seeds]  # noqa: E731 (one value per seed)
        rates = [statistics.mean(runs[s]["rate"][p] for s in seeds) if p in runs[seeds[0]]["rate"] else None
                 for p in ("short", "lighthouse", "dense")]
        rate_text = " / ".join(f"{r / 1e3:.0f}k" if r else "–" for r in rates)
        pairs = [s for s in seeds if s in base] if name != baseline else []
        final = paired([runs[s]["final"] - base[s]["final"] for s in pairs])
        equal_time = paired([runs[s]["final"] - loss_at(base[s]["curve"], runs[s]["train_s"]) for s in pairs])
        rows.append(f"| {name} | {len(seeds)} | {mean_std(values('final'))} | {final} | {equal_time} | "
                    f"{mean_std(values('at_switch'))} | {mean_std(values('spike'))} | {mean_std(values('last_tail'))} | "
                    f"{mean_std(values('far_context'))} | {mean_std(values('copy_accuracy'))} @ "
                    f"{runs[seeds[0]]['copy_distance']} | {rate_text} | {mean_std(values('train_s'), 0)} | "
                    f"{mean_std(values('steady_s'), 0)} | {base_steady / statistics.mean(values('steady_s')):.2f}x |")
    return "\n".join(rows)


def plot(arms, path):
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_position, by_distance) = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, runs in arms.items():
        color = None
        for seed, run in sorted(runs.items()):
            tokens = [t / 1e6 for _, t, _ in run["curve"][1:]]  # from the first evaluation after step 0
            line, = by_tokens.plot(tokens, [l for _, _, l in run["curve"][1:]], color=color, alpha=0.8,
                                   linewidth=1, label=name if color is None else None)
            color = line.get_color()
        seeds = list(runs.values())

        def mean_band(ax, x, key):  # the mean over seeds, and a band of +- one standard deviation
            columns = list(zip(*(r[key] for r in seeds)))
            mean = [statistics.mean(c) for c in columns]
            std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
            ax.plot(x, mean, marker=".", color=color, label=name)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.15)

        mean_band(by_position, [(lo + hi) / 2 for lo, hi in seeds[0]["position_bins"]], "position_loss")
        mean_band(by_distance, seeds[0]["distances"], "copy_gain")
    by_tokens.set(xlabel="training tokens (millions)", ylabel="validation loss (dense attention)",
                  title="every seed")
    by_position.set(xlabel="position in the window", ylabel="loss (nats)", title="loss by position, mean ± std")
    by_distance.set(xlabel="distance D between the copies", ylabel="loss 1st copy - 2nd copy (nats)",
                    title="copy gain, mean ± std")
    for ax in (by_position, by_distance):
        ax.set_xscale("log", base=2)
    for ax in (by_tokens, by_position, by_distance):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", nargs="+", metavar="NAME=FOLDER...",
                        help="an arm and its run folders (a glob, quoted or expanded by the shell)")
    parser.add_argument("--baseline", help="the arm the others are compared with (default: the first)")
    parser.add_argument("--out", help="the figure (needs matplotlib)")
    args = parser.parse_args(argv)
    arms, name = {}, None
    for item in args.arms:  # NAME=FOLDER starts an arm; a bare FOLDER (the shell's expansion) continues it
        if "=" in item:
            name, item = item.split("=", 1)
            arms[name] = {}
        if name is None:
            sys.exit(f"error: {item}: name the arm first, as NAME=FOLDER")
        for folder in sorted(glob.glob(item)) or [item]:
            if not os.path.isfile(os.path.join(folder, "metrics.jsonl")):
                sys.exit(f"error: {folder} has no metrics.jsonl")
            if not os.path.isfile(os.path.join(folder, "eval_long.json")):
                sys.exit(f"error: {folder} has no eval_long.json (python eval_long.py {folder}/ckpt.pt --out "
                         f"{folder}/eval_long.json)")
            run = read_run(folder)
            if run["seed"] is None:
                sys.exit(f"error: {folder}/eval_long.json does not record the seed the run was trained with, so "
                         f"it cannot be paired with the other arms' runs; run eval_long.py on its ckpt.pt again")
            if run["seed"] in arms[name]:
                sys.exit(f"error: arm {name} has two runs with seed {run['seed']} ({arms[name][run['seed']]['folder']} "
                         f"and {folder}); give each arm one run per seed")
            arms[name][run["seed"]] = run
    tails = sorted({run["tail"] for runs in arms.values() for run in runs.values()})
    if len(tails) > 1:
        sys.exit(f"error: the runs' eval_long.json files score different tails ({', '.join(map(str, tails))} "
                 f"tokens): compare runs of one block_size")
    baseline = args.baseline or next(iter(arms))
    if baseline not in arms:
        sys.exit(f"error: no arm named {baseline}")
    print(table(arms, baseline))
    if args.out:
        plot(arms, args.out)


if __name__ == "__main__":
    main()
