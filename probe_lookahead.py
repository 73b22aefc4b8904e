"""
Does a model trained with Lighthouse read the future through its selection?

A causal model predicts token t+1 from tokens 0..t alone. This script checks that directly. For
sampled positions t of validation windows it takes the loss of predicting the true token t+1
twice: from the true window, and from a copy whose inputs *after t + d* are replaced by another
window's tokens (the target stays the true t+1). The difference, foreign minus true, is what the
prediction at t gains from the inputs after t + d. It is measured for
    d = 0                 everything after t replaced, the next token included;
    d = 1, p - 1          t+1 (and more) kept: how far past the next token the gain reaches;
    d = p^(L-1) - 1       the rest of a coarsest span kept;
    d = one tile          the selection's whole reach kept (the paper's selection reads ahead
                          at most to the end of t's tile);
in Lighthouse mode and, as the control, in dense mode, where every difference is exactly 0.
With the paper's selection a trained model reads ahead (lh_selection='paper'); with
lh_selection='causal' it cannot, and the differences are 0 in both modes.

    python probe_lookahead.py out-lh/ckpt.pt [more checkpoints] --windows 8 --positions 32 --json lookahead.json

The windows come from the val.bin of the data each checkpoint was trained on (its data_dir), or
from --data. Each position costs one forward pass per d and mode over a whole window.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import lighthouse_kernel as lk
from model import GPT, CheckpointError


def distances(config):
    """The d of the module docstring for a model's Lighthouse settings, ascending, each once."""
    L, p = config.lh_levels, config.lh_pool
    _, tile = lk.tiles(config.block_size, L, p, config.lh_topk)
    return sorted({0, 1, p - 1, p ** (L - 1) - 1, tile * p ** (L - 1)})


def losses_at(model, inputs, positions, targets, batch, autocast):
    """Cross entropy of the prediction at positions[i] of inputs[i] (rows, N) for targets[i]: (rows,)."""
    out = []
    for s in range(0, len(inputs), batch):
        with torch.no_grad(), autocast:
            logits, _ = model(inputs[s:s + batch])  # (batch, N, vocab)
        rows = torch.arange(logits.shape[0], device=logits.device)
        out.append(F.cross_entropy(logits[rows, positions[s:s + batch]].float(), targets[s:s + batch],
                                   reduction="none"))
    return torch.cat(out)


def measure(model, mode, windows, foreign, positions, ds, batch=8, autocast=None):
    """Loss with the true window, and its change when the inputs after t + d come from `foreign`.

    windows, foreign: (W, N + 1) tokens; positions: (W, S) values of t. Returns (true losses (W*S,),
    {d: foreign minus true (W*S,)}), in the given attention mode (model.mode is restored)."""
    autocast = autocast or torch.autocast("cpu", enabled=False)
    saved = model.mode
    model.set_attention(mode)
    try:
        true, diffs = [], {d: [] for d in ds}
        for x, y, ts in zip(windows, foreign, positions):
            with torch.no_grad(), autocast:
                logits, _ = model(x[None, :-1])  # (1, N, vocab): the true window, once for all t
            base = F.cross_entropy(logits[0, ts].float(), x[ts + 1], reduction="none")  # (S,)
            copies = []  # for each t, for each d: the window with the inputs after t + d foreign (N,)
            for t in ts.tolist():
                for d in ds:
                    copy = x[:-1].clone()
                    copy[t + d + 1:] = y[t + d + 1:-1]
                    copies.append(copy)
            t_all = ts.repeat_interleave(len(ds))  # (S * len(ds),) in the order of the copies
            changed = losses_at(model, torch.stack(copies), t_all, x[t_all + 1], batch, autocast).view(len(ts), -1)
            true.append(base)
            for i, d in enumerate(ds):
                diffs[d].append(changed[:, i] - base)
    finally:
        model.set_attention(saved)
    return torch.cat(true), {d: torch.cat(v) for d, v in diffs.items()}


def summarize(values):
    """Mean and standard error of a 1-d tensor."""
    v = values.double()
    return dict(mean=v.mean().item(), se=(v.std() / len(v) ** 0.5).item() if len(v) > 1 else float("nan"), n=len(v))


def sample(val, N, n_windows, n_positions, reach, seed):
    """n_windows random windows of N + 1 tokens of val, as many foreign ones from elsewhere, and
    n_positions positions t per window with t + reach + 1 < N (so that every d replaces something)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val) - N - 1, (n_windows, 2))

    def window(s):
        return torch.from_numpy(val[s:s + N + 1].astype(np.int64))

    windows = torch.stack([window(a) for a, _ in starts])  # (W, N + 1)
    foreign = torch.stack([window(b) for _, b in starts])
    positions = torch.from_numpy(rng.integers(0, N - reach - 1, (n_windows, n_positions)))  # (W, S)
    return windows, foreign, positions


def probe(ckpt_path, n_windows=8, n_positions=32, device="cpu", batch=8, seed=0, data=None):
    """The measurement for one checkpoint, printed and returned as a dict. Raises SystemExit with a
    message when there is nothing to probe."""
    try:
        model, ckpt = GPT.from_checkpoint(ckpt_path, device)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    c = model.config
    try:
        c.check(lighthouse=True)
    except ValueError as e:  # e.g. a dense baseline whose Lighthouse settings were never used
        raise SystemExit(f"error: {ckpt_path} cannot run Lighthouse attention: {e}") from None
    folder = data or ckpt.get("data_dir")
    if folder is None:
        raise SystemExit(f"{ckpt_path} does not say which data it was trained on: pass --data <folder>")
    path = os.path.join(folder, "val.bin")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: pass --data <folder holding val.bin>")
    val = np.memmap(path, dtype=np.uint16, mode="r")
    N, ds = c.block_size, distances(c)
    if len(val) < 2 * (N + 1):
        raise SystemExit(f"{path} has {len(val)} tokens, too few for windows of {N + 1}")
    windows, foreign, positions = (x.to(device) for x in sample(val, N, n_windows, n_positions, ds[-1], seed))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    result = dict(ckpt=ckpt_path, block_size=N, selection=c.lh_selection, scorer=c.lh_scorer, distances=ds,
                  windows=n_windows, positions=n_positions)
    print(f"{ckpt_path}: N={N}, selection {c.lh_selection}, scorer {c.lh_scorer}; loss at t with the inputs after "
          f"t + d foreign minus with the true ones, mean ± standard error over {n_windows} x {n_positions} positions")
    for mode in ("lighthouse", "dense"):
        true, diffs = measure(model, mode, windows, foreign, positions, ds, batch, autocast)
        result[mode] = dict(loss=summarize(true), gain={d: summarize(v) for d, v in diffs.items()})
        cells = ", ".join(f"d={d}: {s['mean']:+.4f} ± {s['se']:.4f}" for d, s in result[mode]["gain"].items())
        print(f"  {mode:>10} (loss {result[mode]['loss']['mean']:.4f}): {cells}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", help="checkpoints written by train.py")
    parser.add_argument("--data", help="folder holding val.bin (default: the data each checkpoint was trained on)")
    parser.add_argument("--windows", type=int, default=8, help="validation windows (default 8)")
    parser.add_argument("--positions", type=int, default=32, help="positions t per window (default 32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="picks the windows and positions (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("windows", "positions", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device={args.device} but no CUDA GPU is available; use --device=cpu")
    results = [probe(path, args.windows, args.positions, args.device, args.batch, args.seed, args.data)
               for path in args.ckpts]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
