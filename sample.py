"""
Sample text from a trained checkpoint, always with dense attention.

    python sample.py --out_dir=out-quick-cpu --start="ROMEO:" --num_samples=2 --max_new_tokens=300
"""

import argparse
import contextlib
import json
import os

import torch

import prepare_data
from train import build_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    parser.add_argument("--start", default="\n", help="the prompt; FILE:path reads it from a file")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="< 1 sharper, > 1 more random")
    parser.add_argument("--top_k", type=int, default=200, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: train a model first (python train.py config/quick_cpu.py)")
    ckpt = torch.load(path, map_location=args.device, weights_only=False)
    model = build_model(ckpt["config"], ckpt["meta"]["vocab_size"]).to(args.device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    encode, decode = prepare_data.load_tokenizer(ckpt["meta"])

    prompt = args.start
    if prompt.startswith("FILE:"):
        prompt = open(prompt[5:], encoding="utf-8").read()
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
