"""
Benchmarks (GPU). Three modes:

    python bench.py                          # one layer: ours vs dense SDPA (cuDNN, flash), every N
    python bench.py --lengths 32768 --topk 1536   # one length, another topk
    python bench.py --mode=breakdown         # where one layer's time goes, stage by stage (N=98304)
    python bench.py --mode=train --config=config/books_32k.py   # a training step, dense vs Lighthouse

Layer mode: B=1, H=8, D=128, bf16, L=3, p=4, topk=2048 (1536 at N=98304, 1024 at
N=16384 where 2048 is outside the layer's domain), forward and
forward+backward timed with CUDA events (median), peak memory of forward+backward above the
inputs. Speedups and memory ratios are against cuDNN dense SDPA measured in the same process.
Results are printed as a table and written to --json (default bench.json).
"""

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lighthouse_kernel as lk
from model import GPT, GPTConfig, read_config_file

LENGTHS = [16384, 32768, 65536, 98304, 131072, 262144, 524288]
B, H, D, LEVELS, POOL = 1, 8, 128, 3, 4
H100_PEAK_FLOPS = 989e12  # dense bf16 peak of one H100 SXM, train.py's default peak_flops (for MFU)


def topk_for(N, topk=None):
    """The given topk, else the table's: 2048, 1536 at 98304, and 1024 at 16384, where
    16384 / 16 = 1024 coarsest entries hold only 8 tiles of 128 (topk 2048 is outside the domain)."""
    return topk or {16384: 1024, 98304: 1536}.get(N, 2048)


def time_ms(fn, budget_ms=400, max_reps=50):
    """Median time of fn() in ms: one warm-up call, then as many timed calls as fit the budget
    (at least 3). Each call is timed with its own pair of CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(3, budget_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn):
    """Memory allocated at the peak of fn(), above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_inputs(N, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, H, N, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, k, v, dout


def layer_variants(N, topk):
    def dense(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attend

    return {
        "dense cuDNN": dense(SDPBackend.CUDNN_ATTENTION),
        "dense flash": dense(SDPBackend.FLASH_ATTENTION),
        "lighthouse": lambda q, k, v: lk.lighthouse_attention(q, k, v, LEVELS, POOL, topk, impl="triton"),
    }


def bench_layers(lengths, topk=None):
    rows = []
    for N in lengths:
        q, k, v, dout = make_inputs(N)
        budget = 400 if N <= 131072 else 1  # long dense runs take seconds: time them 3 times
        topk_N = topk_for(N, topk)
        for name, attend in layer_variants(N, topk_N).items():
            def forward():
                with torch.no_grad():
                    attend(q, k, v)

            def forward_backward():
                torch.autograd.backward(attend(q, k, v), dout)
                q.grad = k.grad = v.grad = None

            rows.append(dict(N=N, topk=topk_N, impl=name, fwd_ms=time_ms(forward, budget),
                             fwd_bwd_ms=time_ms(forward_backward, budget), peak_mib=peak_mib(forward_backward)))
            print(json.dumps(rows[-1]), flush=True)
        del q, k, v, dout
    return rows


def print_layer_table(rows):
    print(f"\n{'N':>7} {'impl':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'speedup':>8} {'peak MiB':>9} {'mem/dense':>9}")
    dense = {r["N"]: r for r in rows if r["impl"] == "dense cuDNN"}
    for r in rows:
        base = dense[r["N"]]
        print(f"{r['N']:>7} {r['impl']:<12} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>11.2f} "
              f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:>7.1f}x {r['peak_mib']:>9.0f} "
              f"{r['peak_mib'] / base['peak_mib']:>9.2f}")


def bench_breakdown(N, topk=None):
    """Each stage of our layer on its own, forward then backward, at length N."""
    topk = topk_for(N, topk)
    q, k, v, dout = make_inputs(N)
    G = k.shape[1]
    q_up, q_score = lk.triton_pyramid(q, G, LEVELS, POOL, with_scores=True)
    k_up, k_score = lk.triton_pyramid(k, G, LEVELS, POOL, with_scores=True)
    v_up, _ = lk.triton_pyramid(v, G, LEVELS, POOL, with_scores=False)
    idx, inv = lk.triton_select(q_score, k_score, N, LEVELS, POOL, topk)
    sel = [lk._PyramidGather.apply(x, up, idx, inv, H, LEVELS, POOL).detach().requires_grad_()
           for x, up in ((q, q_up), (k, k_up), (v, v_up))]
    attn = F.scaled_dot_product_attention(*sel, is_causal=True)
    d_attn = torch.randn_like(attn)

    def sdpa_fwd_bwd(backend=None):
        def run():
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                a = F.scaled_dot_product_attention(*sel, is_causal=True)
            torch.autograd.backward(a, d_attn)
        return run

    # the backward kernels are timed by calling the autograd functions' backward directly
    scatter_ctx = type("ctx", (), dict(saved_tensors=(idx,), levels=LEVELS, pool=POOL, dtype=attn.dtype))
    gather_ctxs = [type("ctx", (), dict(saved_tensors=(inv,), shape=x.shape, dtype=x.dtype, levels=LEVELS,
                                        pool=POOL)) for x in (q, k, v)]
    d_sel = torch.randn_like(sel[0])
    stages = {
        "pyramid + scores (q, k, v)": lambda: [lk.triton_pyramid(x, G, LEVELS, POOL, x is not v) for x in (q, k, v)],
        "selection + causal order": lambda: lk.triton_select(q_score, k_score, N, LEVELS, POOL, topk),
        "gather (q, k, v)": lambda: [lk._PyramidGather.apply(x, up, idx, inv, H, LEVELS, POOL)
                                     for x, up in ((q, q_up), (k, k_up), (v, v_up))],
        "SDPA fwd (default backend)": lambda: F.scaled_dot_product_attention(*sel, is_causal=True),
        "scatter": lambda: lk._CausalScatter.apply(attn, idx, inv, N, LEVELS, POOL),
        "scatter backward": lambda: lk._CausalScatter.backward(scatter_ctx, dout),
        "SDPA fwd+bwd cuDNN": sdpa_fwd_bwd(SDPBackend.CUDNN_ATTENTION),
        "SDPA fwd+bwd flash": sdpa_fwd_bwd(SDPBackend.FLASH_ATTENTION),
        "SDPA fwd+bwd default": sdpa_fwd_bwd(),
        "gather backward (q, k, v)": lambda: [lk._PyramidGather.backward(c, d_sel) for c in gather_ctxs],
        "whole layer fwd (no grad)": torch.no_grad()(
            lambda: lk.lighthouse_attention(q, k, v, LEVELS, POOL, topk, impl="triton")),
        "whole layer fwd+bwd": lambda: torch.autograd.backward(
            lk.lighthouse_attention(q, k, v, LEVELS, POOL, topk, impl="triton"), dout),
    }
    rows = []
    for name, fn in stages.items():
        rows.append(dict(N=N, topk=topk, stage=name, ms=time_ms(fn)))
        q.grad = k.grad = v.grad = None
    print(f"\nbreakdown at N={N}, topk={topk}, M={idx.shape[2]} (B={B}, H={H}, D={D}, bf16)")
    for r in rows:
        print(f"  {r['stage']:<28} {r['ms']:8.3f} ms")
    return rows


def bench_train(config_path, iters):
    """Tokens per second of full training steps (forward, backward, AdamW) of a config's model,
    dense vs Lighthouse, on random tokens (the data does not change the work)."""
    settings = read_config_file(config_path)
    model_config = GPTConfig.from_settings(dict(settings, vocab_size=257))  # byte-level, as the configs train
    model_config.check(lighthouse=True)
    batch_size = settings.get("batch_size", 1)  # sequences per step: one micro-step of the config's
    peak_flops = settings.get("peak_flops", H100_PEAK_FLOPS)
    rows = []
    for mode in ("dense", "lighthouse"):
        torch.manual_seed(0)
        model = GPT(model_config).cuda()
        model.set_attention(mode)
        # AdamW as train.py sets it up; its hyperparameters do not change the work
        optimizer = model.configure_optimizer(learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                              device_type="cuda")
        x = torch.randint(0, 257, (batch_size, model_config.block_size + 1), device="cuda")  # (batch, block_size + 1)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        ms = time_ms(step, budget_ms=iters * 1000, max_reps=iters)
        tokens = batch_size * model_config.block_size
        rows.append(dict(config=config_path, mode=mode, ms_per_step=ms, tok_per_s=tokens / ms * 1e3,
                         mfu=model.estimate_mfu(tokens / ms * 1e3, peak_flops),
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30))
        print(json.dumps(rows[-1]), flush=True)
        del model, optimizer
    print(f"\n{config_path}: Lighthouse phase step is {rows[0]['ms_per_step'] / rows[1]['ms_per_step']:.2f}x "
          f"faster than dense ({rows[1]['tok_per_s']:,.0f} vs {rows[0]['tok_per_s']:,.0f} tok/s)")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["layer", "breakdown", "train"], default="layer")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--config", default="config/books_32k.py")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--topk", type=int, help="layer and breakdown modes: this topk at every length")
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py needs a CUDA GPU")
    started = time.time()
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"))
    print(info)
    if args.mode == "layer":
        rows = bench_layers(args.lengths, args.topk)
        print_layer_table(rows)
    elif args.mode == "breakdown":
        rows = [r for N in args.lengths for r in bench_breakdown(N, args.topk)]
    else:
        try:
            rows = bench_train(args.config, args.iters)
        except ValueError as e:  # an unreadable config file, or settings the model cannot run
            sys.exit(f"error: {e}")
    with open(args.json, "w") as f:
        json.dump(dict(info, mode=args.mode, rows=rows), f, indent=1)
    print(f"wrote {args.json} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
