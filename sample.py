"""
Sample text from a trained checkpoint, always with dense attention.

    python sample.py                                 # out/ckpt.pt (out is train.py's default out_dir)
    python sample.py config/quick_cpu.py             # the checkpoint of that config's run (its out_dir)
    python sample.py --out_dir=out-quick-cpu --start="ROMEO:" --num_samples=2 --max_new_tokens=300
"""

import argparse
import contextlib
import math
import os
import re
import sys

import torch

import prepare_data
from model import GPT, CheckpointError, read_config_file

DEFAULT_OUT_DIR = "out"  # train.py's default out_dir


def checkpoint_path(args):
    """(out_dir/ckpt.pt, the train.py command that writes it): --out_dir, else the config file's
    out_dir, else train.py's default."""
    out_dir, command = args.out_dir, "python train.py"
    if args.config:
        command += f" {args.config}"
        if out_dir is None:
            try:
                out_dir = read_config_file(args.config).get("out_dir", DEFAULT_OUT_DIR)
            except ValueError as e:  # the message names the file
                sys.exit(f"error: {e}")
    if args.out_dir:
        command += f" --out_dir={args.out_dir}"
    return os.path.join(out_dir or DEFAULT_OUT_DIR, "ckpt.pt"), command


def check_settings(args):
    """Exit with a one-line message for a setting that would crash the sampling or quietly do
    something else than asked."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        sys.exit(f"error: --device must be cpu, cuda or cuda:<n> (got {args.device!r})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device={args.device} but no CUDA GPU is available; use --device=cpu")
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        sys.exit(f"error: --device={args.device} but this machine has {torch.cuda.device_count()} GPU(s); "
                 f"use --device=cuda:0")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        sys.exit(f"error: --temperature must be a number above 0 (got {args.temperature}); 0.8 is a good start, "
                 f"and --top_k=1 always picks the likeliest token")
    if args.top_k < 1:
        sys.exit(f"error: --top_k must be at least 1 (got {args.top_k}): 1 always picks the likeliest token, "
                 f"a value at or above the vocabulary size samples among all tokens")
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be at least 1 (got {getattr(args, name)})")


def read_prompt(start):
    """The prompt: --start itself, or the text of the file it names as FILE:path."""
    prompt = start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            sys.exit(f"error: cannot read the prompt file {start[5:]!r} ({reason}); give a readable UTF-8 text "
                     f"file after FILE:")
    if not prompt:
        sys.exit("error: the prompt is empty; give --start some text")
    return prompt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="a train.py config file: sample from its run's out_dir")
    parser.add_argument("--out_dir", help=f"folder holding ckpt.pt (default: the config file's out_dir, "
                                          f"else {DEFAULT_OUT_DIR})")
    parser.add_argument("--start", default="\n", help="the prompt; FILE:path reads it from a file")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="< 1 sharper, > 1 more random")
    parser.add_argument("--top_k", type=int, default=200, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_settings(args)  # before the checkpoint is read: a bad setting is named, not blamed on the file
    prompt = read_prompt(args.start)

    path, command = checkpoint_path(args)
    if not os.path.exists(path):
        sys.exit(f"{path} not found: train a model first ({command})")
    try:
        model, ckpt = GPT.from_checkpoint(path, args.device)  # plain data only: a shared file cannot run code
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    encode, decode = prepare_data.load_tokenizer(ckpt["meta"])
    start = torch.tensor([encode(prompt)], dtype=torch.long, device=args.device)  # (1, prompt tokens)
    torch.manual_seed(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else contextlib.nullcontext()
    samples = []
    with autocast:
        for _ in range(args.num_samples):
            tokens = model.generate(start, args.max_new_tokens, args.temperature, args.top_k)[0].tolist()
            samples.append(decode(tokens))
            print(samples[-1])
            print("-" * 40)
    return samples


if __name__ == "__main__":
    main()
