"""
Does a model trained with Lighthouse read the future through the selection?

The selection of a tile depends on the norms of all the tile's tokens, so under Lighthouse the
prediction at t can depend on tokens after t in its tile (up to N / (topk/128) - 1 ahead).
This script feeds each validation window twice: whole, and with everything after a cut in the
middle of a tile replaced by text from elsewhere. It compares the mean loss of the tokens before
the cut in that tile (where the look-ahead can act) and in the whole tile before it (where it
cannot). A model that uses the look-ahead scores better with the true continuation.

    python probe_lookahead.py --ckpt out-lh/ckpt.pt --windows 32 --json probe.json

The validation windows come from the val.bin of the data the checkpoint was trained on (its
data_dir), or from --data.
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


def token_losses(model, batch, mode, autocast):
    """Per-token cross entropy (rows, N) of batch (rows, N + 1) with the given attention."""
    model.set_attention(mode)
    with torch.no_grad(), autocast:
        logits, _ = model(batch[:, :-1])  # (rows, N, vocab)
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(batch.shape[0], -1)


def probe(ckpt_path, windows, device, seed=0, data=None):
    """The loss differences, per mode and span, of windows from val.bin in data (default: the
    checkpoint's data folder). Raises SystemExit with a message when there is nothing to probe."""
    try:
        model, ckpt = GPT.from_checkpoint(ckpt_path, device)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    c = model.config
    try:
        c.check(lighthouse=True)
    except ValueError as e:  # e.g. a dense baseline whose Lighthouse settings were never used
        raise SystemExit(f"error: {ckpt_path} cannot run Lighthouse attention: {e}") from None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    N = c.block_size
    tile = N // (c.lh_topk // lk.TILE_KEEP)  # tokens per selection tile
    cut_tile = N // tile // 2 - 1  # a tile in the middle of the window, with a tile before it
    if cut_tile < 1:
        raise SystemExit(f"block_size {N} has fewer than 4 selection tiles of {tile} tokens: nothing to probe")
    cut = cut_tile * tile + tile // 2
    in_tile = slice(cut_tile * tile, cut - 1)  # predictions of tokens before the cut, in the cut's tile
    tile_before = slice((cut_tile - 1) * tile, cut_tile * tile)

    folder = data or ckpt.get("data_dir")
    if folder is None:
        raise SystemExit(f"{ckpt_path} does not say which data it was trained on: pass --data <folder>")
    path = os.path.join(folder, "val.bin")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: pass --data <folder holding val.bin>")
    val = np.memmap(path, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(seed)
    diffs = {mode: {"in_tile": [], "tile_before": []} for mode in ("lighthouse", "dense")}
    for _ in range(windows):
        a, b = rng.integers(0, len(val) - N - 1, 2)
        whole = torch.from_numpy(val[a:a + N + 1].astype(np.int64))
        foreign = whole.clone()
        foreign[cut:] = torch.from_numpy(val[b:b + N + 1 - cut].astype(np.int64))
        batch = torch.stack([whole, foreign]).to(device)  # (2, N + 1)
        for mode in diffs:
            loss = token_losses(model, batch, mode, autocast)  # (2, N)
            for name, span in (("in_tile", in_tile), ("tile_before", tile_before)):
                diffs[mode][name].append((loss[1, span].mean() - loss[0, span].mean()).item())
    print(f"N={N}, tiles of {tile} tokens, cut at {cut}; loss with a foreign future minus loss with "
          f"the true one, mean ± standard error over {windows} windows:")
    for mode, d in diffs.items():
        for name, values in d.items():
            values = np.array(values)
            print(f"  {mode:>10}, {name:<11}: {values.mean():+.5f} ± {values.std() / len(values) ** 0.5:.5f}")
    return dict(block_size=N, tile=tile, cut=cut, windows=windows, diffs=diffs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--data", help="folder holding val.bin (default: the data the checkpoint was trained on)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the per-window differences here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device={args.device} but no CUDA GPU is available; use --device=cpu")
    result = probe(args.ckpt, args.windows, args.device, data=args.data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
