"""
Benchmarks (GPU). Five modes:

    python bench.py                                   # one layer, every variant vs dense SDPA, every N
    python bench.py --lengths 65536 --variants norm   # one length, one variant
    python bench.py --lengths 65536 --variants dilated+sdpa dilated+fused dilated+fp8   # the dilated scorer's kernels
    python bench.py --mode=breakdown                  # one layer's time stage by stage (N=98304)
    python bench.py --mode=train --configs config/books_64k.py config/paper_98k.py   # training steps
    python bench.py --mode=fp8_agreement --ckpt out/ckpt.pt   # FP8 vs bf16 dilated scores on a model's activations
    python bench.py --mode=cp --configs config/paper_98k.py --json cp.json     # long steps on one GPU...
    torchrun --standalone --nproc_per_node=2 bench.py --mode=cp --configs config/paper_98k.py --json cp.json  # ...CP=2

Layer mode: B=1, H=8, D=128, bf16, L=3, p=4, topk=2048 (1536 at N=98304, 1024 at N=16384 where
2048 is outside the layer's domain); q, k, v and the output gradient laid out as the model makes
them ((B, N, H, D) in memory), or as (B, H, N, D) tensors with --layout contiguous. Forward and
forward+backward are timed with CUDA events (median), peak memory is that of forward+backward
above the inputs. Speedups and memory ratios are against cuDNN dense SDPA measured in the same
process. The variants: the scorer (norm | dilated, dilation 4), where RoPE is applied
(before_pool | +span_end), the selection (the paper's | +causal) and the dilated scorer's kernel
(lighthouse_kernel.DILATED_KERNEL: the default and +sdpa, its two SDPA passes | +fused, the fused
kernel in bf16 | +fp8, in FP8); a "dilated scorer" row times the scorer alone (forward; peak
memory above the inputs), once per kernel among the variants.

Breakdown mode: each stage of the layer on its own, plus two before/after measurements of
copies the layer avoids: the scatter backward reading a transposed gradient through its strides
vs copying it first, and grouped-query attention (H=32 query heads over 8 kv heads) through
SDPA's own GQA vs k and v expanded to 32 heads.

Train mode: full training steps (forward, backward, AdamW) of each config's model on random
tokens, dense vs Lighthouse, eager vs torch.compile: tokens/s, MFU (model FLOPs utilisation:
the FLOPs the model needs per second over the card's peak) and peak memory, the loss of the first
step (the same weights and tokens in every case, so eager and compiled must agree to bf16 noise),
plus the CUDA kernels that take the most time in one compiled step of each mode.

FP8 agreement mode: a train.py checkpoint runs Lighthouse-mode forward passes (bf16 autocast, the
dilated scorer on SDPA, as it trains) over random windows of its validation data; for the q, k, v
each Lighthouse layer receives, the dilated scores are computed three ways: SDPA (the reference),
the fused kernel with FP8 matrix products, and the fused kernel in bf16 (a control: the same
arithmetic as SDPA in another order, so its agreement is what rounding alone costs). Reported
per layer: the fraction of the reference's selection (the checkpoint's settings) that each
selects too, and FP8's relative score difference.

CP mode: training steps of a config's model at long lengths (forward, backward, AdamW; eager, bf16
autocast, one sequence, random tokens, the config's checkpointing), in each phase: on one GPU, or
under torchrun with each sequence shared by all the processes (context parallelism, as train.py
runs it): seconds per step (wall clock, after a warm-up step at a short length, 32768 tokens for
paper_98k; --iters steps per length, default here 1) and peak memory per GPU (the largest over the
processes). Its rows are added to those already in --json, so that a one-GPU run and a CP run
make one table. lh_topk: --topk,
else 2048 (the config's 1536 does not cut 262144 tokens into equal tiles).

Results are printed as tables and written to --json (default bench.json).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

import context_parallel as cp
import lighthouse_kernel as lk
import model as model_module
from model import GPT, CheckpointError, GPTConfig, read_config_file, rope_tables

LENGTHS = [16384, 32768, 65536, 98304, 131072, 262144, 524288]
B, H, D, LEVELS, POOL = 1, 8, 128, 3, 4
VARIANTS = ["norm", "norm+span_end", "dilated", "dilated+sdpa", "dilated+span_end", "norm+causal"]  # the default
MORE_VARIANTS = ["dilated+fused", "dilated+fp8"]  # the dilated scorer's fused kernel in bf16, in FP8
DEFAULT_DILATED_KERNEL = lk.DILATED_KERNEL  # read before the layer mode sets it per variant
H100_PEAK_FLOPS = 989e12  # dense bf16 peak of one H100 SXM (an H200 has the same), for MFU


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


def make_inputs(N, heads=H, kv_heads=H, seed=0, layout="model", device="cuda"):
    """Random bf16 q (B, heads, N, D), k, v (B, kv_heads, N, D) and an output gradient. layout
    "model": each a transposed view of a (B, N, heads, D) tensor, as the model's projections make
    them; "contiguous": (B, heads, N, D) tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(h, grad=True):
        if layout == "model":
            x = torch.randn(B, N, h, D, device=device, generator=gen, dtype=torch.bfloat16).transpose(1, 2)
        else:
            x = torch.randn(B, h, N, D, device=device, generator=gen, dtype=torch.bfloat16)
        return x.requires_grad_(grad)

    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads, grad=False)


def layer_variants(N, topk, variants):
    cos, sin = (t.cuda() for t in rope_tables(D, N, 10000.0))

    def dense(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attend

    def ours(variant):  # e.g. "dilated+span_end": the scorer, then options (span_end, causal, sdpa, fused, fp8)
        scorer, *options = variant.split("+")
        rope = (cos, sin) if "span_end" in options else None
        selection = "causal" if "causal" in options else "paper"
        kernel = dilated_kernel(variant)

        def attend(q, k, v):
            lk.DILATED_KERNEL = kernel  # a module setting: each variant sets its own
            return lk.lighthouse_attention(q, k, v, LEVELS, POOL, topk, impl="triton", scorer=scorer, rope=rope,
                                           selection=selection)
        return attend

    attends = {"dense cuDNN": dense(SDPBackend.CUDNN_ATTENTION)}
    if N <= 131072:  # flash is ~1.7x slower than cuDNN; past 128K it only costs time to show it again
        attends["dense flash"] = dense(SDPBackend.FLASH_ATTENTION)
    attends.update({variant: ours(variant) for variant in variants})
    return attends


def dilated_kernel(variant):
    """The dilated scorer's kernel a variant names ("dilated+fp8": "fp8"), else the one the model
    uses by default (lighthouse_kernel.DILATED_KERNEL as the module sets it)."""
    return next((option for option in variant.split("+")[1:] if option in lk.DILATED_KERNELS), DEFAULT_DILATED_KERNEL)


def bench_layers(lengths, topk, variants, layout="model"):
    rows = []
    for N in lengths:
        q, k, v, dout = make_inputs(N, layout=layout)
        budget = 400 if N <= 131072 else 1  # long dense runs take seconds: time them 3 times
        topk_N = topk_for(N, topk)
        for name, attend in layer_variants(N, topk_N, variants).items():
            def forward():
                with torch.no_grad():
                    attend(q, k, v)

            def forward_backward():
                torch.autograd.backward(attend(q, k, v), dout)
                q.grad = k.grad = v.grad = None

            rows.append(dict(N=N, topk=topk_N, layout=layout, impl=name, fwd_ms=time_ms(forward, budget),
                             fwd_bwd_ms=time_ms(forward_backward, budget), peak_mib=peak_mib(forward_backward)))
            print(json.dumps(rows[-1]), flush=True)
        for kernel in dict.fromkeys(dilated_kernel(v) for v in variants if v.startswith("dilated")):
            def score():  # the scorer's own cost, forward only
                lk.triton_dilated_scores(q, k, v, 4, kernel)

            rows.append(dict(N=N, topk=topk_N, layout=layout, impl=f"dilated scorer ({kernel})",
                             fwd_ms=time_ms(score, budget), peak_mib=peak_mib(score)))
            print(json.dumps(rows[-1]), flush=True)
        del q, k, v, dout
    return rows


def print_layer_table(rows):
    print(f"\n{'N':>7} {'impl':<24} {'fwd ms':>8} {'fwd+bwd ms':>11} {'vs cuDNN':>9} {'peak MiB':>9} {'mem/dense':>9}")
    dense = {r["N"]: r for r in rows if r["impl"] == "dense cuDNN"}
    for r in rows:
        if "fwd_bwd_ms" not in r:  # a scorer alone: forward only
            print(f"{r['N']:>7} {r['impl']:<24} {r['fwd_ms']:>8.2f} {'':>11} {'':>9} {r['peak_mib']:>9.0f}")
            continue
        base = dense[r["N"]]
        print(f"{r['N']:>7} {r['impl']:<24} {r['fwd_ms']:>8.2f} {r['fwd_bwd_ms']:>11.2f} "
              f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:>8.1f}x {r['peak_mib']:>9.0f} "
              f"{r['peak_mib'] / base['peak_mib']:>9.2f}")


def bench_breakdown(N, topk=None):
    """Each stage of our layer on its own (norm scorer, RoPE before pooling) at length N, then
    the copies the layer avoids, before and after."""
    topk = topk_for(N, topk)
    q, k, v, dout = make_inputs(N)
    scores = lk.triton_norm_scores(q, k, LEVELS, POOL)
    idx, inv = lk.triton_select(*scores, N, LEVELS, POOL, topk)
    sel = [lk.triton_gather(x, idx, inv, LEVELS, POOL, None, None).detach().requires_grad_() for x in (q, k, v)]
    attn = F.scaled_dot_product_attention(*sel, is_causal=True)
    d_attn = torch.randn_like(attn)

    def sdpa_fwd_bwd(backend=None):
        def run():
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                a = F.scaled_dot_product_attention(*sel, is_causal=True)
            torch.autograd.backward(a, d_attn)
        return run

    def layer_fwd_bwd():
        torch.autograd.backward(lk.lighthouse_attention(q, k, v, LEVELS, POOL, topk, impl="triton"), dout)
        q.grad = k.grad = v.grad = None

    stages = {
        "norm score pyramids (q, k)": lambda: lk.triton_norm_scores(q, k, LEVELS, POOL),
        "selection + causal order": lambda: lk.triton_select(*scores, N, LEVELS, POOL, topk),
        "pool + gather (q, k, v)": lambda: [lk.triton_gather(x, idx, inv, LEVELS, POOL, None, None) for x in (q, k, v)],
        "SDPA fwd (default backend)": lambda: F.scaled_dot_product_attention(*sel, is_causal=True),
        "scatter": lambda: lk.triton_scatter(attn, idx, inv, N, LEVELS, POOL),
        "scatter backward": lambda: lk._scatter_backward_op(dout, idx, LEVELS, POOL),
        "SDPA fwd+bwd cuDNN": sdpa_fwd_bwd(SDPBackend.CUDNN_ATTENTION),
        "SDPA fwd+bwd flash": sdpa_fwd_bwd(SDPBackend.FLASH_ATTENTION),
        "SDPA fwd+bwd default": sdpa_fwd_bwd(),
        "gather backward (q, k, v)": lambda: [
            lk._gather_backward_op(d_attn, inv, list(x.shape), True, LEVELS, POOL, None, None) for x in (q, k, v)],
        "whole layer fwd (no grad)": torch.no_grad()(
            lambda: lk.lighthouse_attention(q, k, v, LEVELS, POOL, topk, impl="triton")),
        "whole layer fwd+bwd": layer_fwd_bwd,
    }
    rows = []
    for name, fn in stages.items():
        rows.append(dict(N=N, topk=topk, stage=name, ms=time_ms(fn)))
    print(f"\nbreakdown at N={N}, topk={topk}, M={idx.shape[2]} (B={B}, H={H}, D={D}, bf16)")
    for r in rows:
        print(f"  {r['stage']:<28} {r['ms']:8.3f} ms")
    return rows


def bench_copies(N=262144, heads=32, kv_heads=8):
    """Before/after of the two copies the layer avoids, at (1, 32, 262144, 128) bf16:
    1. the scatter backward reads the model's transposed gradient through its strides; before,
       it made it contiguous first (a copy of all of (B, H, N, D));
    2. grouped-query attention on the gathered entries through SDPA's own GQA; before, k and v
       were gathered into all 32 query heads (4x their size, and 4x their gradients)."""
    topk = topk_for(N)
    q, k, v, dout = make_inputs(N, heads, kv_heads)
    scores = lk.triton_norm_scores(q, k, LEVELS, POOL)
    idx, inv = lk.triton_select(*scores, N, LEVELS, POOL, topk)
    sel = [lk.triton_gather(x, idx, inv, LEVELS, POOL, None, None).detach().requires_grad_() for x in (q, k, v)]
    expanded = [x.detach().repeat_interleave(heads // kv_heads, dim=1).requires_grad_() for x in sel[1:]]
    d_attn = torch.randn_like(sel[0])

    def attend(q_sel, k_sel, v_sel, gqa):
        torch.autograd.backward(F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True, enable_gqa=gqa),
                                d_attn)

    cases = {
        "scatter backward, strided gradient (now)": lambda: lk._scatter_backward_op(dout, idx, LEVELS, POOL),
        "scatter backward, gradient copied first (before)": lambda: lk._scatter_backward_op(
            dout.contiguous(), idx, LEVELS, POOL),
        "SDPA fwd+bwd on M, SDPA's own GQA (now)": lambda: attend(*sel, True),
        "SDPA fwd+bwd on M, k and v expanded (before)": lambda: attend(sel[0], *expanded, False),
    }
    rows = []
    print(f"\ncopies avoided at B={B}, H={heads}, H_kv={kv_heads}, N={N}, D={D}, bf16 (M={idx.shape[2]})")
    for name, fn in cases.items():
        rows.append(dict(N=N, heads=heads, kv_heads=kv_heads, stage=name, ms=time_ms(fn), peak_mib=peak_mib(fn)))
        print(f"  {name:<50} {rows[-1]['ms']:8.3f} ms  {rows[-1]['peak_mib']:8.0f} MiB")
    return rows


def top_kernels(step, count=8):
    """The CUDA kernels that take the most time in one call of step(), as (name, ms, share)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]  # GPU kernels and copies
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [(e.key[:70], e.self_device_time_total / 1e3, e.self_device_time_total / total) for e in events[:count]]


def bench_train(config_path, iters, phases):
    """Tokens per second of full training steps (forward, backward, AdamW) of a config's model,
    dense and/or Lighthouse (phases), eager vs compiled, on random tokens (the data does not change
    the work)."""
    settings = read_config_file(config_path)
    model_config = GPTConfig.from_settings(dict(settings, vocab_size=257))  # byte-level, as the configs train
    model_config.check(lighthouse=True)
    batch_size = settings.get("batch_size", 1)  # sequences per step: one micro-step of the config's
    peak_flops = settings.get("peak_flops", H100_PEAK_FLOPS)
    tokens = batch_size * model_config.block_size
    rows = []
    cases = [(compiled, mode, False) for compiled in (False, True) for mode in phases]
    if model_config.activation_checkpointing:  # and compiled, keeping attention's outputs instead of recomputing
        cases += [(True, mode, True) for mode in phases]
    for compiled, mode, keep_attention in cases:
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(model_config, checkpoint_keep_attention=keep_attention)).cuda()
        model.set_attention(mode)
        # AdamW as train.py sets it up; its hyperparameters do not change the work
        optimizer = model.configure_optimizer(learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                              device_type="cuda")
        run = torch.compile(model, dynamic=False) if compiled else model
        x = torch.randint(0, 257, (batch_size, model_config.block_size + 1), device="cuda")  # (batch, block + 1)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = run(x[:, :-1], x[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        started = time.time()
        first_loss = step().item()  # the first step compiles; same weights and tokens in every case
        first_s = time.time() - started
        torch.cuda.reset_peak_memory_stats()
        ms = time_ms(step, budget_ms=iters * 1000, max_reps=iters)
        row = dict(config=config_path, mode=mode, compiled=compiled, keep_attention=keep_attention, ms_per_step=ms,
                   tok_per_s=tokens / ms * 1e3, mfu=model.estimate_mfu(tokens / ms * 1e3, peak_flops),
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, first_step_s=first_s,
                   first_loss=first_loss)
        if compiled:
            row["top_kernels"] = top_kernels(step)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, optimizer, run
        torch.cuda.empty_cache()
    return rows


def print_train_table(rows):
    print(f"\n{'config':<22} {'mode':<11} {'compiled':<9} {'keep attn':<10} {'ms/step':>8} {'tok/s':>9} {'MFU':>6} "
          f"{'peak GiB':>9} {'1st loss':>9} {'1st step s':>10}")
    for r in rows:
        print(f"{r['config']:<22} {r['mode']:<11} {str(r['compiled']):<9} {str(r['keep_attention']):<10} "
              f"{r['ms_per_step']:>8.1f} {r['tok_per_s']:>9,.0f} {100 * r['mfu']:>5.1f}% {r['peak_gib']:>9.1f} "
              f"{r['first_loss']:>9.5f} {r['first_step_s']:>10.1f}")
    for config in dict.fromkeys(r["config"] for r in rows):
        step = {(r["mode"], r["compiled"], r["keep_attention"]): r["ms_per_step"] for r in rows if r["config"] == config}
        for mode in dict.fromkeys(r["mode"] for r in rows if r["config"] == config):
            eager = step[mode, False, False]
            kept = f", keeping attention {eager / step[mode, True, True]:.2f}x" if (mode, True, True) in step else ""
            print(f"{config} {mode}: compiled {eager / step[mode, True, False]:.2f}x faster than eager{kept}")
        if ("dense", True, False) in step and ("lighthouse", True, False) in step:
            print(f"{config}: Lighthouse vs dense step, both compiled: "
                  f"{step['dense', True, False] / step['lighthouse', True, False]:.2f}x faster")
    for r in rows:
        if "top_kernels" in r:
            keep = ", keeping attention" if r["keep_attention"] else ""
            print(f"\ntop CUDA kernels, one compiled {r['mode']} step of {r['config']}{keep}:")
            for name, ms, share in r["top_kernels"]:
                print(f"  {ms:8.1f} ms {100 * share:5.1f}%  {name}")


def selection_agreement(a, b):
    """The fraction of the entries selected in a (B, G, M) (-1: an unused slot) that b selects too."""
    hits = sum((torch.isin(x, y) & (x >= 0)).sum().item() for x, y in zip(a.flatten(0, 1), b.flatten(0, 1)))
    return hits / (a >= 0).sum().item()


def bench_fp8_agreement(ckpt_path, n_windows, seed=0):
    """FP8 agreement mode (see the module docstring): rows of (window, layer, agreement, the
    relative difference of the q- and k-scores)."""
    try:
        model, ckpt = GPT.from_checkpoint(ckpt_path, "cuda")
        model.config.check(lighthouse=True)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {ckpt_path}: {e}") from None
    c = model.config
    path = os.path.join(ckpt.get("data_dir") or "", "val.bin")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: the checkpoint's data_dir must hold the val.bin it was trained with")
    val = np.memmap(path, dtype=np.uint16, mode="r")
    if len(val) <= c.block_size:
        raise SystemExit(f"error: {path} has {len(val)} tokens, too few for a window of {c.block_size + 1}")
    starts = np.random.default_rng(seed).integers(0, len(val) - c.block_size, n_windows)
    layers, rows = model.lighthouse_layers(), []
    layer_itself = model_module.lighthouse_attention

    def measure(q, k, v, *args, **kwargs):  # each Lighthouse layer calls this instead of the layer
        # each kernel's (q-scores, k-scores), each (B, G, N), and the selection they make; SDPA is the
        # reference (what the model trained with), the fused kernel in bf16 the control: its scores
        # differ from SDPA's only by summation order, so its agreement is what rounding alone costs
        scores = {kernel: lk.triton_dilated_scores(q, k, v, c.lh_dilation, kernel)
                  for kernel in ("sdpa", "fused", "fp8")}
        chosen = {kernel: lk.lighthouse_select(*s, c.lh_levels, c.lh_pool, c.lh_topk, selection=c.lh_selection)
                  for kernel, s in scores.items()}
        row = dict(window=len(rows) // len(layers), layer=layers[len(rows) % len(layers)])
        for kernel in ("fp8", "fused"):
            row[f"{kernel}_agreement"] = selection_agreement(chosen[kernel], chosen["sdpa"])
            for side, name in enumerate("qk"):
                ours, reference = scores[kernel][side], scores["sdpa"][side]
                row[f"{kernel}_{name}_score_rel_diff"] = ((ours - reference).norm() / reference.norm()).item()
        rows.append(row)
        return layer_itself(q, k, v, *args, **kwargs)

    model.set_attention("lighthouse")
    lk.DILATED_KERNEL = "sdpa"  # the activations of the model as it trained
    model_module.lighthouse_attention = measure
    try:
        for start in starts:
            x = torch.from_numpy(val[start:start + c.block_size].astype(np.int64)).cuda()[None]  # (1, N)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)
    finally:
        model_module.lighthouse_attention = layer_itself
    print(f"\n{ckpt_path}: N={c.block_size}, L={c.lh_levels}, p={c.lh_pool}, topk={c.lh_topk}, dilation "
          f"{c.lh_dilation}, selection {c.lh_selection}; {n_windows} windows of {path}")
    print("agreement with the SDPA scores' selection (mean, min over windows) and the scores' relative difference")
    print(f"{'layer':>5} {'FP8 agreement':>14} {'min':>7} {'bf16 fused':>11} {'min':>7} "
          f"{'FP8 q-diff':>11} {'FP8 k-diff':>11}")
    for layer in [*layers, "all"]:
        mine = [r for r in rows if layer in ("all", r["layer"])]
        column = lambda key: [r[key] for r in mine]  # noqa: E731
        fp8, fused = column("fp8_agreement"), column("fused_agreement")
        print(f"{layer:>5} {statistics.mean(fp8):>14.4f} {min(fp8):>7.4f} {statistics.mean(fused):>11.4f} "
              f"{min(fused):>7.4f} {statistics.mean(column('fp8_q_score_rel_diff')):>11.4f} "
              f"{statistics.mean(column('fp8_k_score_rel_diff')):>11.4f}")
    return rows


def bench_cp(config_path, lengths, phases, topk, iters, json_path):
    """Seconds per training step and peak memory per GPU of a config's model at each length, on one
    GPU or (under torchrun) with every sequence shared by all processes. Rows go to json_path as
    they come (with those already there), so a run cut short keeps what it measured."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    mesh = None
    if world > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        mesh = cp.make_mesh(world, "cuda")
    settings = read_config_file(config_path)
    topk = topk or 2048
    base = GPTConfig.from_settings(dict(settings, vocab_size=257, block_size=max(lengths), lh_topk=topk))
    lighthouse = "lighthouse" in phases
    base.check(lighthouse)
    warm_up = base.lh_pool ** (base.lh_levels - 1) * topk  # the shortest length the layer takes: one tile of 128
    for N in [warm_up, *lengths]:  # before any work: every length one the layer takes, and one that shards
        if lighthouse:
            lk.check_lighthouse_config(N, base.lh_levels, base.lh_pool, topk)
        cp.check_context_parallel(world, world, True, N, lighthouse, base.lh_levels, base.lh_pool, topk, base.lh_scorer,
                                  base.lh_selection)
    rows = []
    if os.path.exists(json_path):
        with open(json_path) as f:
            rows = [r for r in json.load(f)["rows"] if "gpus" in r]  # earlier CP-mode runs
    for mode in phases:
        torch.manual_seed(0)
        model = GPT(base).cuda()
        model.set_attention(mode)
        optimizer = model.configure_optimizer(learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                              device_type="cuda")
        run = DDP(model) if mesh is not None else model  # CP: gradients averaged over the processes, as train.py

        def step(N):
            tokens = torch.randint(0, 257, (1, N + 1), generator=torch.Generator().manual_seed(N)).cuda()  # (1, N+1)
            x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            with cp.sequence_sharded(model, mesh, x, y):  # (with CP: this process's share of x, y)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = run(x, y)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(warm_up)  # compiles the Triton kernels and allocates AdamW's state
        for N in lengths:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            if mesh is not None:
                dist.barrier()
            started = time.time()
            for _ in range(iters):
                step(N)
            torch.cuda.synchronize()
            seconds = (time.time() - started) / iters
            peak = torch.tensor([seconds, torch.cuda.max_memory_allocated() / 2**30], device="cuda")
            if mesh is not None:  # the slowest process and the largest memory
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            rows.append(dict(config=config_path, N=N, topk=topk, mode=mode, gpus=world, s_per_step=peak[0].item(),
                             peak_gib_per_gpu=peak[1].item(), steps=iters, gpu=torch.cuda.get_device_name(),
                             torch=torch.__version__, date=time.strftime("%Y-%m-%d")))
            if int(os.environ.get("RANK", 0)) == 0:
                print(json.dumps(rows[-1]), flush=True)
                with open(json_path, "w") as f:
                    json.dump(dict(mode="cp", rows=rows), f, indent=1)
        del model, optimizer, run
        torch.cuda.empty_cache()
    if mesh is not None:
        dist.destroy_process_group()
    return rows


def print_cp_table(rows):
    print(f"\n{'N':>8} {'phase':<11} {'GPUs':>4} {'s/step':>8} {'vs 1 GPU':>9} {'peak GiB/GPU':>13}")
    one = {(r["N"], r["mode"]): r["s_per_step"] for r in rows if r["gpus"] == 1}
    for r in sorted(rows, key=lambda r: (r["N"], r["mode"], r["gpus"])):
        speedup = f"{one[r['N'], r['mode']] / r['s_per_step']:.2f}x" if (r["N"], r["mode"]) in one else ""
        print(f"{r['N']:>8} {r['mode']:<11} {r['gpus']:>4} {r['s_per_step']:>8.2f} {speedup:>9} "
              f"{r['peak_gib_per_gpu']:>13.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["layer", "breakdown", "train", "fp8_agreement", "cp"], default="layer")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="default: all of LENGTHS (layer), 98304 (breakdown), 262144 524288 (cp)")
    parser.add_argument("--phases", nargs="+", choices=["dense", "lighthouse"], default=["dense", "lighthouse"],
                        help="cp and train modes")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS + MORE_VARIANTS, default=VARIANTS, help="layer mode")
    parser.add_argument("--layout", choices=["model", "contiguous"], default="model",
                        help="layer mode: q, k, v as the model makes them ((B, N, H, D) in memory) or (B, H, N, D)")
    parser.add_argument("--configs", nargs="+", default=["config/books_64k.py"], help="train mode; cp mode: the first")
    parser.add_argument("--iters", type=int, help="train mode: timed steps per case (default 10); cp mode: per length "
                                                  "(default 1)")
    parser.add_argument("--topk", type=int, help="layer and breakdown modes: this topk at every length; cp mode: "
                                                  "the model's lh_topk (default 2048)")
    parser.add_argument("--ckpt", help="fp8_agreement mode: a checkpoint written by train.py")
    parser.add_argument("--windows", type=int, default=4, help="fp8_agreement mode: validation windows")
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args()
    if args.mode == "fp8_agreement" and not args.ckpt:
        parser.error("--mode=fp8_agreement needs --ckpt <checkpoint written by train.py>")
    if args.windows < 1:
        parser.error(f"--windows must be >= 1 (got {args.windows})")
    if not torch.cuda.is_available():
        raise SystemExit("bench.py needs a CUDA GPU (it times GPU kernels); none is available here")
    started = time.time()
    if args.mode == "cp":  # it writes --json itself, row by row (under torchrun: rank 0)
        try:
            rows = bench_cp(args.configs[0], args.lengths or [262144, 524288], args.phases, args.topk, args.iters or 1,
                            args.json)
        except ValueError as e:  # an unreadable config file, or settings that cannot run or shard
            raise SystemExit(f"error: {e}") from None
        if int(os.environ.get("RANK", 0)) == 0:
            print_cp_table(rows)
            print(f"wrote {args.json} ({time.time() - started:.0f} s)")
        return
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"))
    print(info)
    if args.mode == "layer":
        rows = bench_layers(args.lengths or LENGTHS, args.topk, args.variants, args.layout)
        print_layer_table(rows)
    elif args.mode == "breakdown":
        rows = [r for N in args.lengths or [98304] for r in bench_breakdown(N, args.topk)] + bench_copies()
    elif args.mode == "fp8_agreement":
        rows = bench_fp8_agreement(args.ckpt, args.windows)
    else:
        try:
            rows = [r for config in args.configs for r in bench_train(config, args.iters or 10, args.phases)]
        except ValueError as e:  # an unreadable config file, or settings the model cannot run
            raise SystemExit(f"error: {e}") from None
        print_train_table(rows)
    with open(args.json, "w") as f:
        json.dump(dict(info, mode=args.mode, rows=rows), f, indent=1)
    print(f"wrote {args.json} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
