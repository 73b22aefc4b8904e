"""
How well does a trained model use a long context? Each checkpoint is evaluated with dense attention
(the model that is deployed) on windows of its own block_size N, cut from a token file (default:
the val.bin of the data it was trained on), three ways:

1. Loss by position. The mean loss of the prediction made at position t (after reading t + 1
   tokens) over --windows windows, in the bins [0, 64), [64, 128), [128, 256), ... up to N; in
   nats, and in bits per byte (nats / ln 2) for byte-level data. A model that uses its context
   keeps getting better further into the window.
2. Far context. The loss of each window's last T tokens given the whole window, and given only
   the window's last C tokens, for C = T, 4T, 16T, ... below N. loss(C) - loss(full) is what the
   tokens more than C back are worth. T = 1024, or N / 2 for windows shorter than 2048 tokens.
3. Copy at a distance. A passage of --passage tokens, cut from elsewhere in the file (a different
   one per trial), is planted 128 tokens into a real window and again D tokens later. D is start
   to start: the powers of two from 256 that are at least the passage length, and the largest D
   that keeps both copies in the window, N - 128 - passage. A model that can look D tokens back
   and copy scores much better on the second copy than on the first. Reported per D over --trials
   trials: the loss on each copy, the gain (first - second) and the accuracy (the fraction of
   tokens that are the model's argmax). The passage is natural text, so a model that reads it
   well once can read it near-perfectly the second time. Scored are the passage's tokens after its
   first: the first follows unrelated text both times, so no copying can predict it.
   With --letters the passage is random lowercase letters instead (for a model trained with
   copy_source = 'letters'): without recall no model can do better than chance, ln 26 = 3.258
   nats a letter, on either copy, so the second copy's loss below ln 26 is recall and nothing else.

    python eval_long.py out-dense/ckpt.pt out-lh/ckpt.pt --out eval.json    # also writes eval.png
    python eval_long.py out/ckpt.pt --data data/pg19_bytes/val.bin --windows 16 --trials 8 --batch 2

Windows are random spans of the file (they may cross a document boundary, as training windows do),
drawn from --seed: the same command gives the same JSON, bit for bit, on a CPU. On a GPU the model
runs under bf16 autocast. The JSON holds the settings and one entry per checkpoint; the plot (loss
by position, copy gain against D, one line per checkpoint) needs matplotlib.
"""

import argparse
import contextlib
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import prepare_data
from model import GPT, CheckpointError

PREFIX = 128  # tokens of real text before the first copy of the passage
TAIL = 1024  # the far-context measurement scores each window's last TAIL tokens (fewer in short windows)
MIN_DISTANCE = 256  # the shortest copy distance


def position_bins(N):
    """[(0, 64), (64, 128), (128, 256), ...], the last bin ending at N."""
    edges = [0]
    edge = 64
    while edge < N:
        edges.append(edge)
        edge *= 2
    edges.append(N)
    return list(zip(edges[:-1], edges[1:]))


def tail_length(N):
    """How many of a window's last tokens the far-context measurement scores: TAIL, or half the
    window if that is less, so that there is always a truncated context (the last T tokens) that
    leaves some of the window out."""
    return min(TAIL, N // 2)


def context_lengths(N):
    """The truncated contexts of the far-context measurement: T * 4^k below N, T = tail_length(N)."""
    lengths = []
    C = tail_length(N)
    while C < N:
        lengths.append(C)
        C *= 4
    return lengths


def copy_distances(N, passage):
    """Start-to-start distances D of the two copies: powers of two from 256 (and at least the passage
    length, so the copies do not overlap), then the largest that keeps both copies in the window."""
    largest = N - PREFIX - passage
    distances = []
    D = MIN_DISTANCE
    while D <= largest:
        if D >= passage:
            distances.append(D)
        D *= 2
    if largest >= max(MIN_DISTANCE, passage) and largest not in distances:
        distances.append(largest)
    return distances


@torch.no_grad()
def token_losses(model, seq, autocast):
    """Loss and argmax hit, each (B, L - 1), of predicting seq[:, 1:] from what precedes each token.
    One batch's logits at a time, dropped on return: at a large vocabulary they are the big tensor."""
    inputs, targets = seq[:, :-1], seq[:, 1:]  # each (B, L - 1)
    with autocast:
        logits, _ = model(inputs)  # (B, L - 1, vocab)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B * (L - 1),)
    hits = logits.argmax(-1) == targets  # (B, L - 1)
    return losses.view(targets.shape), hits


def windows_at(data, starts, length, device):
    """The windows data[s:s + length] for s in starts, as a (len(starts), length) int64 tensor."""
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64)).to(device)


def position_and_context(model, data, N, windows, batch, seed, autocast, device, bar):
    """Measurements 1 and 2 on the same windows: the full window's forward pass serves both."""
    rng = np.random.default_rng([seed, 0])
    starts = rng.integers(0, len(data) - N, size=windows)  # windows of N + 1 tokens: N inputs, N targets
    contexts, T = context_lengths(N), tail_length(N)
    position_sum = torch.zeros(N, dtype=torch.float64)
    # per window, the mean loss of its last T tokens given each truncated context, then the full window
    tail = np.zeros((windows, len(contexts) + 1))
    for i in range(0, windows, batch):
        seq = windows_at(data, starts[i:i + batch], N + 1, device)  # (B, N + 1)
        rows = slice(i, i + len(seq))
        losses, _ = token_losses(model, seq, autocast)  # (B, N)
        position_sum += losses.double().sum(0).cpu()
        tail[rows, -1] = losses[:, -T:].double().mean(1).cpu().numpy()
        for j, C in enumerate(contexts):
            short, _ = token_losses(model, seq[:, -C - 1:], autocast)  # (B, C): the same targets, C tokens of context
            tail[rows, j] = short[:, -T:].double().mean(1).cpu().numpy()
        bar.update(len(seq) * (N + sum(contexts)))

    per_position = position_sum / windows  # (N,)
    bins = position_bins(N)
    gains = tail[:, :-1] - tail[:, -1:]  # (windows, len(contexts)): loss(C) - loss(full), per window
    position = dict(bins=[list(b) for b in bins], loss=[per_position[lo:hi].mean().item() for lo, hi in bins],
                    loss_all=per_position.mean().item())
    context = dict(tail=T, contexts=contexts, loss=tail[:, :-1].mean(0).tolist(),
                   loss_full=tail[:, -1].mean().item(), gain=gains.mean(0).tolist(),
                   gain_stderr=(gains.std(0) / math.sqrt(windows)).tolist())
    return position, context


def copy_probe(model, data, N, trials, passage, batch, seed, autocast, device, bar, letters=None):
    """Measurement 3. Every trial draws one real window of N tokens and one passage from outside it;
    each distance D uses the first PREFIX + D + passage tokens of that window with the passage planted
    at PREFIX and at PREFIX + D. The model is causal, so the text after the second copy would not
    change its losses: the shorter window gives the same numbers for less work, and the first copy,
    with the same text before it at every D, is the same baseline for all of them. letters: token
    ids; given, each passage is random letters instead of text from the file."""
    n = len(data)
    rng = np.random.default_rng([seed, 1])
    bases, passages = [], []
    for _ in range(trials):
        s = int(rng.integers(0, n - N + 1))
        # the passage starts anywhere it does not overlap the window: before it, or after it
        before, after = max(0, s - passage + 1), max(0, n - passage - (s + N) + 1)
        j = int(rng.integers(0, before + after))
        p = j if j < before else s + N + (j - before)
        bases.append(data[s:s + N])
        passages.append(data[p:p + passage])
    bases = np.stack(bases).astype(np.int64)  # (trials, N)
    passages = np.stack(passages).astype(np.int64)  # (trials, passage)
    if letters is not None:  # the same windows as with text; only the passage changes
        passages = np.array(letters)[rng.integers(0, len(letters), (trials, passage))]  # (trials, passage)

    distances = copy_distances(N, passage)
    # per distance and trial: the mean loss and the accuracy on each copy
    first, second, hits_first, hits_second = (np.zeros((len(distances), trials)) for _ in range(4))
    for d, D in enumerate(distances):
        seq = bases[:, :PREFIX + D + passage].copy()  # (trials, PREFIX + D + passage)
        seq[:, PREFIX:PREFIX + passage] = passages
        seq[:, PREFIX + D:PREFIX + D + passage] = passages
        # the loss at t predicts token t + 1: the passage's tokens 1.. of the copy at a are scored at a..a+passage-2
        one, two = slice(PREFIX, PREFIX + passage - 1), slice(PREFIX + D, PREFIX + D + passage - 1)
        for i in range(0, trials, batch):
            rows = slice(i, min(i + batch, trials))
            losses, hits = token_losses(model, torch.from_numpy(seq[rows]).to(device), autocast)  # each (B, L - 1)
            first[d, rows] = losses[:, one].double().mean(1).cpu().numpy()
            second[d, rows] = losses[:, two].double().mean(1).cpu().numpy()
            hits_first[d, rows] = hits[:, one].double().mean(1).cpu().numpy()
            hits_second[d, rows] = hits[:, two].double().mean(1).cpu().numpy()
            bar.update((rows.stop - rows.start) * seq.shape[1])
    gains = first - second  # (distances, trials)
    return dict(passage=passage, prefix=PREFIX, source="text" if letters is None else "letters",
                chance=None if letters is None else math.log(len(letters)), distances=distances,
                loss_first=first.mean(1).tolist(), loss_second=second.mean(1).tolist(), gain=gains.mean(1).tolist(),
                gain_stderr=(gains.std(1) / math.sqrt(trials)).tolist(), accuracy_first=hits_first.mean(1).tolist(),
                accuracy_second=hits_second.mean(1).tolist())


def evaluate(model, data, N, windows=64, trials=32, passage=256, batch=1, seed=0, device="cpu", desc="eval",
             letters=None):
    """All three measurements of model (anything called as model(idx) -> (logits, None)) on data
    (a uint16 token array) with windows of N tokens; letters: see copy_probe. Returns {"position",
    "context", "copy"}."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    total = windows * (N + sum(context_lengths(N))) + trials * sum(PREFIX + D + passage for D in
                                                                    copy_distances(N, passage))
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True) as bar:
        position, context = position_and_context(model, data, N, windows, batch, seed, autocast, device, bar)
        copy = copy_probe(model, data, N, trials, passage, batch, seed, autocast, device, bar, letters)
    return dict(position=position, context=context, copy=copy)


def open_tokens(path, N, passage, vocab_size):
    """The uint16 token file at path as a memmap, or SystemExit saying why it cannot be used."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file {path} not found")
    size = os.path.getsize(path)
    if size % 2:
        raise SystemExit(f"error: {path} has an odd number of bytes: not a file of uint16 tokens")
    need = N + 2 * passage  # a window, and room for a passage outside it on one side or the other
    if size // 2 < need:
        raise SystemExit(f"error: {path} has {size // 2} tokens; block_size {N} with --passage {passage} needs "
                         f"at least N + 2 * passage = {need}")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if data.max() >= vocab_size:
        raise SystemExit(f"error: {path} holds token {data.max()}, outside the model's vocabulary of {vocab_size}: "
                         f"was it made with another tokenizer?")
    return data


def print_report(entry):
    pos, ctx, copy = entry["position"], entry["context"], entry["copy"]
    bpb = pos["bits_per_byte"]
    print(f"\n{entry['checkpoint']}: block_size {entry['block_size']}, {entry['tokenizer']} tokens, "
          f"data {entry['data']}")
    print("  loss by position" + ("      nats  bits/byte" if bpb else "      nats"))
    for k, ((lo, hi), loss) in enumerate(zip(pos["bins"], pos["loss"])):
        print(f"    [{lo:>6}, {hi:>6})  {loss:8.4f}" + (f"  {bpb[k]:9.4f}" if bpb else ""))
    print(f"  loss of the last {ctx['tail']} tokens: {ctx['loss_full']:.4f} after the full window")
    for C, loss, gain, se in zip(ctx["contexts"], ctx["loss"], ctx["gain"], ctx["gain_stderr"]):
        print(f"    after the last {C:>6} tokens: {loss:.4f} ({gain:+.4f} ± {se:.4f})")
    what = "random letters" if copy.get("source") == "letters" else "text"
    print(f"  copy of a {copy['passage']}-token passage ({what}) D tokens later (start to start)"
          + (f"; chance {copy['chance']:.3f} nats a letter" if copy.get("chance") else ""))
    print("         D   1st copy  2nd copy  gain              acc 1st  acc 2nd")
    for k, D in enumerate(copy["distances"]):
        print(f"    {D:>6}  {copy['loss_first'][k]:8.4f}  {copy['loss_second'][k]:8.4f}  "
              f"{copy['gain'][k]:+.4f} ± {copy['gain_stderr'][k]:.4f}  {copy['accuracy_first'][k]:7.3f}  "
              f"{copy['accuracy_second'][k]:7.3f}")


def plot(entries, path):
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot (pip install matplotlib for {path})")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_position, by_distance) = plt.subplots(1, 2, figsize=(10, 3.8))
    for entry in entries:
        pos, copy = entry["position"], entry["copy"]
        middles = [(lo + hi) / 2 for lo, hi in pos["bins"]]
        by_position.plot(middles, pos["loss"], marker="o", label=entry["checkpoint"])
        by_distance.plot(copy["distances"], copy["gain"], marker="o", label=entry["checkpoint"])
    for ax in (by_position, by_distance):
        ax.set_xscale("log", base=2)  # the bins and distances double
    by_position.set(xlabel="position in the window (bin middle)", ylabel="loss (nats)", title="loss by position")
    by_distance.set(xlabel="distance D between the copies (tokens)", ylabel="loss on 1st copy - loss on 2nd (nats)",
                    title="copy gain")
    by_distance.axhline(0, color="gray", linewidth=0.5)
    by_position.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", nargs="+", help="checkpoints written by train.py")
    parser.add_argument("--data", help="uint16 token file (default: val.bin of each checkpoint's data)")
    parser.add_argument("--out", default="eval_long.json", help="results as JSON")
    parser.add_argument("--plot", help="the plot (default: --out with .png)")
    parser.add_argument("--windows", type=int, default=64, help="windows for loss by position and far context")
    parser.add_argument("--trials", type=int, default=32, help="copy trials per distance")
    parser.add_argument("--passage", type=int, default=256, help="tokens in the copied passage")
    parser.add_argument("--letters", action="store_true", help="random lowercase letters as the passage, not text")
    parser.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("windows", "trials", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.passage < 2:
        parser.error("--passage must be >= 2 (its first token is not scored)")

    entries = []
    for path in args.ckpt:
        try:
            model, ckpt = GPT.from_checkpoint(path, args.device)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        N, meta = model.config.block_size, ckpt["meta"]
        if not copy_distances(N, args.passage):
            raise SystemExit(f"error: {path} has block_size {N}: the copy probe needs {PREFIX} + {MIN_DISTANCE} + "
                             f"passage <= block_size; lower --passage")
        if args.data is None and "data_dir" not in ckpt:
            raise SystemExit(f"error: {path} does not name its data (no data_dir); pass --data")
        data_path = args.data or os.path.join(ckpt["data_dir"], "val.bin")
        data = open_tokens(data_path, N, args.passage, model.config.vocab_size)
        # the training seed pairs runs of different arms in compare_arms.py
        entry = dict(checkpoint=path, train_seed=ckpt["config"].get("seed"), block_size=N, tokenizer=meta["tokenizer"],
                     parameters=model.num_params(non_embedding=False), data=data_path, data_tokens=len(data))
        letters = prepare_data.letter_tokens(meta) if args.letters else None
        entry.update(evaluate(model, data, N, args.windows, args.trials, args.passage, args.batch, args.seed,
                              args.device, desc=os.path.basename(os.path.dirname(os.path.abspath(path))),
                              letters=letters))
        # a byte-level token is one byte: bits per byte is the loss in bits
        nats = entry["position"]["loss"]
        entry["position"]["bits_per_byte"] = [x / math.log(2) for x in nats] if meta["tokenizer"] == "bytes" else None
        entries.append(entry)

    settings = dict(windows=args.windows, trials=args.trials, passage=args.passage, letters=args.letters,
                    prefix=PREFIX, batch=args.batch, seed=args.seed, device=args.device,
                    dtype="bfloat16" if args.device.startswith("cuda") else "float32")
    results = dict(settings=settings, data=args.data, checkpoints=entries)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for entry in entries:
        print_report(entry)
    print(f"\nresults written to {args.out}")
    plot(entries, args.plot or os.path.splitext(args.out)[0] + ".png")
    return results


if __name__ == "__main__":
    main()
