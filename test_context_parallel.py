"""
Tests of context parallelism (context_parallel.py): the layout, the Lighthouse layer chunk by chunk
against one sequence's, the whole layer on two CPU processes, the errors for settings that cannot
shard, and (on a machine with 2 GPUs) a whole model under CP=2 against one GPU.

    python -m pytest -q test_context_parallel.py
"""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import context_parallel as cp
import lighthouse_kernel as lk
import train
from model import GPT, GPTConfig, rope_tables

FP32_TOL = 1e-5  # relative error between computations that differ only in the order of sums


def assert_near(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected|."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def random_qkv(B, H, G, N, D, seed):
    """q (B, H, N, D), k, v (B, G, N, D) with row norms that vary (never zeros), as the model makes them."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=gen) * (torch.rand(B, h, N, 1, generator=gen) * 2 + 0.5)
            for h in (H, G, G)]


def test_layout():
    """Rank r holds chunks r and 2W-1-r of 2W, in that order; shard and unshard are inverses."""
    assert cp.positions(0, 2, 8).tolist() == [0, 1, 6, 7]
    assert cp.positions(1, 2, 8).tolist() == [2, 3, 4, 5]
    x = torch.randn(2, 36, 3)
    for world in (1, 2, 3):
        shares = [cp.shard(x, r, world, dim=1) for r in range(world)]
        assert all(s.shape == (2, 36 // world, 3) for s in shares)
        assert torch.equal(cp.unshard(torch.stack(shares), world, dim=1), x)
    assert torch.equal(cp.shard(x, 2, 3, dim=1)[:, :6], x[:, 12:18])  # rank 2 of 3: chunks 2 and 3 of 6
    assert torch.equal(cp.shard(x, 2, 3, dim=1)[:, 6:], x[:, 18:24])


def to_global(idx, chunk, n, seq_len, levels, pool):
    """Pyramid indices of a chunk of n tokens (its own layout) -> indices in the whole sequence's layout."""
    local, _ = lk.level_offsets(n, levels, pool)
    whole, _ = lk.level_offsets(seq_len, levels, pool)
    out = idx.clone()
    for lvl in range(levels):
        at = (idx >= local[lvl]) & (idx < local[lvl] + n // pool**lvl)
        out[at] = idx[at] - local[lvl] + whole[lvl] + chunk * n // pool**lvl
    return out


# (N, levels, pool, topk, world): one tile per chunk; two tiles per chunk; three ranks
SHARDABLE = [(4096, 2, 4, 512, 2), (8192, 3, 2, 1024, 2), (6144, 2, 4, 768, 3)]


@pytest.mark.parametrize("case", SHARDABLE, ids=lambda c: "N{}-L{}-p{}-k{}-W{}".format(*c))
def test_chunks_select_and_gather_as_one_sequence(case):
    """Each chunk, selected on its own with topk / 2W, selects the entries one sequence selects there,
    in the same causal order, and gathers the same rows (RoPE at the span end at global positions)."""
    N, L, p, topk, W = case
    B, H, G, D = 1, 4, 2, 16
    q, k, v = random_qkv(B, H, G, N, D, seed=sum(case))
    cos, sin = rope_tables(D, N, 10000.0)
    q_score, k_score = (lk.ref_score_pyramid(s, L, p) for s in lk.ref_token_scores(q, k, v))
    idx = lk.ref_select(q_score, k_score, N, L, p, topk)  # (B, G, M) one sequence's selection
    whole = [lk.ref_gather(lk.ref_pyramid(x, L, p), idx) for x in (q, k, v)]
    whole[:2] = [lk.ref_rope_at_span_end(x, idx, cos, sin, N, L, p) for x in whole[:2]]
    n, m = N // (2 * W), idx.shape[2] // (2 * W)  # tokens and gathered entries per chunk
    for c in range(2 * W):
        part = slice(c * n, (c + 1) * n)
        *sel, idx_c, _ = cp.select_and_gather(q[:, :, part], k[:, :, part], v[:, :, part], L, p, topk // (2 * W),
                                              rope=(cos[part], sin[part]))
        assert torch.equal(to_global(idx_c, c, n, N, L, p), idx[:, :, c * m:(c + 1) * m]), f"chunk {c}'s selection"
        for name, x_c, x in zip("qkv", sel, whole):
            assert_near(x_c, x[:, :, c * m:(c + 1) * m], FP32_TOL, f"chunk {c}'s gathered {name}")


@pytest.mark.parametrize("case", SHARDABLE, ids=lambda c: "N{}-L{}-p{}-k{}-W{}".format(*c))
def test_chunks_scatter_as_one_sequence(case):
    """Scattering each chunk's share of the attention output on its own, plus the carry of the chunk
    before it, gives one sequence's scatter (without the carry the first tokens of every chunk but
    the first would miss their coarser entries' outputs)."""
    N, L, p, topk, W = case
    B, H, G, D = 1, 4, 2, 8
    q, k, v = random_qkv(B, H, G, N, D, seed=sum(case) + 1)
    q_score, k_score = (lk.ref_score_pyramid(s, L, p) for s in lk.ref_token_scores(q, k, v))
    inv = lk.inverse_map(lk.ref_select(q_score, k_score, N, L, p, topk), q_score.shape[2])
    attn = torch.randn(B, H, lk.gathered_length(N, L, p, topk), D)  # one sequence's attention output
    expected = lk.ref_scatter(attn, inv, N, L, p)
    n, m = N // (2 * W), attn.shape[2] // (2 * W)
    outs, carries = {}, {}
    for c in range(2 * W):
        part = slice(c * n, (c + 1) * n)
        *_, idx_c, inv_c = cp.select_and_gather(q[:, :, part], k[:, :, part], v[:, :, part], L, p, topk // (2 * W))
        a = attn[:, :, c * m:(c + 1) * m]
        outs[c], carries[c] = cp.scatter(a, idx_c, inv_c, n, L, p), cp.carry(a, inv_c, n, L, p)
    # as the ranks exchange them: every rank's two carries, in rank order (W, 2, B, H, L-1, D)
    by_rank = torch.stack([torch.stack([carries[c] for c in cp.chunk_ids(r, W)]) for r in range(W)])
    reach = p ** (L - 1) - 1
    for r in range(W):
        for c, received in zip(cp.chunk_ids(r, W), cp.received_carries(by_rank, r, W)):
            outs[c] = torch.cat([cp.head_with_carry(outs[c], received, L, p), outs[c][:, :, reach:]], dim=2)
    assert_near(torch.cat([outs[c] for c in range(2 * W)], dim=2), expected, FP32_TOL, "scatter")


def spawn(worker, world, *args):
    """Run worker(rank, world, rendezvous, *args) in `world` processes; an error in any fails the test.
    rendezvous: the init_method of their process group, a file of a fresh folder (a free TCP port
    picked here could be taken before the processes bind it)."""
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = "file://" + os.path.join(folder, "rendezvous")
        mp.start_processes(worker, args=(world, rendezvous, *args), nprocs=world, start_method="spawn")


def ring_stand_in(q, k, v, is_causal):
    """What torch's ring attention computes on the ranks' shares (CPU processes have no ring):
    causal attention over the whole sequence, gathered, then this rank's share of it."""
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    whole = [cp.unshard(cp.all_gather(x, group), world, dim=2) for x in (q, k, v)]
    return cp.shard(ring_stand_in.sdpa(*whole, is_causal=is_causal), rank, world, dim=2)


ring_stand_in.sdpa = F.scaled_dot_product_attention  # the real one


def cpu_worker(rank, world, rendezvous):
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        # torch's context_parallel cuts a sequence as shard() does
        from torch.distributed.tensor.experimental import context_parallel
        mesh = cp.make_mesh(world, "cpu")
        tokens = torch.arange(3 * 64).view(3, 64)
        with context_parallel(mesh, buffers=[tokens], buffer_seq_dims=[1], no_restore_buffers={tokens}):
            assert torch.equal(tokens, cp.shard(torch.arange(3 * 64).view(3, 64), rank, world, dim=1))

        # the layer on this rank's share equals its share of one sequence's layer, forward and backward
        N, L, p, topk = 2048, 2, 4, 512  # one tile of 128 coarsest entries per chunk
        B, H, G, D = 2, 4, 2, 16
        q, k, v = random_qkv(B, H, G, N, D, seed=0)  # the same on every rank
        cos, sin = rope_tables(D, N, 10000.0)
        d_out = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1))
        whole = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = lk.lighthouse_reference(*whole, L, p, topk, rope=(cos, sin))
        expected.backward(d_out)
        shard = cp.Shard(rank, world, dist.group.WORLD)
        rope = tuple(cp.shard(t, rank, world, dim=0) for t in (cos, sin))  # the tables at this rank's positions
        for impl in ("torch", "triton"):  # the reference's steps, and the kernels (Triton's CPU interpreter)
            mine = [cp.shard(x, rank, world, dim=2).requires_grad_() for x in (q, k, v)]
            F.scaled_dot_product_attention = ring_stand_in
            out = cp.lighthouse_cp(*mine, shard, L, p, topk, rope=rope, impl=impl)
            out.backward(cp.shard(d_out, rank, world, dim=2))
            F.scaled_dot_product_attention = ring_stand_in.sdpa
            assert_near(out, cp.shard(expected, rank, world, dim=2), FP32_TOL, f"rank {rank}, {impl}: output")
            for name, x, x_whole in zip("qkv", mine, whole):
                expected_grad = cp.shard(x_whole.grad, rank, world, dim=2)
                assert_near(x.grad, expected_grad, FP32_TOL, f"rank {rank}, {impl}: d{name}")

        # a whole model (dense layers through the stand-in too): loss and gradients averaged over the
        # ranks equal one sequence's; with activation checkpointing too (the backward recomputes the
        # blocks, collectives included, on every rank)
        tokens = torch.randint(0, 257, (2, N + 1), generator=torch.Generator().manual_seed(2))
        config = GPTConfig(block_size=N, vocab_size=257, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=96,
                           dense_layers=[0], lh_levels=L, lh_pool=p, lh_topk=topk, lh_rope="span_end")
        torch.manual_seed(0)  # the same weights on both ranks (spawned processes start from different seeds)
        model = GPT(config)
        names = ["loss"] + [name for name, _ in model.named_parameters()]
        for mode, checkpointing in (("lighthouse", False), ("dense", False), ("lighthouse", True)):
            model.set_attention(mode)
            config.activation_checkpointing = config.checkpoint_keep_attention = checkpointing
            results = []
            for share in (None, shard):  # the whole sequence, then this rank's share
                model.zero_grad()
                model.set_shard(share)
                F.scaled_dot_product_attention = ring_stand_in.sdpa if share is None else ring_stand_in
                x, y = tokens[:, :-1], tokens[:, 1:]
                if share is not None:
                    x, y = cp.shard(x, rank, world, dim=1), cp.shard(y, rank, world, dim=1)
                loss = model(x, y)[1]
                loss.backward()
                results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
            for t in results[1]:  # the mean over the ranks, as DDP takes it
                dist.all_reduce(t)
                t /= world
            for name, got, expected in zip(names, results[1], results[0]):
                assert_near(got, expected, FP32_TOL, f"rank {rank}, {mode}, checkpointing {checkpointing}: {name}")
    finally:
        F.scaled_dot_product_attention = ring_stand_in.sdpa
        dist.destroy_process_group()


# Triton's CPU interpreter breaks on numpy 2.4 and newer (requirements.txt pins numpy<2.4); a GPU
# image may carry a newer one, and there test_model_on_two_gpus covers the same code on the GPUs.
NUMPY_TOO_NEW = tuple(int(part) for part in np.__version__.split(".")[:2]) >= (2, 4)


@pytest.mark.skipif(NUMPY_TOO_NEW, reason=f"triton's interpreter breaks on numpy {np.__version__} (needs <2.4)")
def test_layer_and_model_on_two_processes(monkeypatch):
    """Two CPU processes (gloo) run the Lighthouse layer, then a whole model in both phases, on their
    shares, with a stand-in for the ring (exact attention over the gathered sequence): torch's
    layout, the carry exchange and its gradient, global RoPE positions, the loss, against the
    reference on the whole sequence."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the processes run the kernels on CPU tensors, on any machine
    spawn(cpu_worker, 2)


def test_config_errors():
    """Settings that cannot shard are refused with the fix; the values a message names do work."""
    def check(cp_degree=2, world=2, gpu=True, N=98304, lighthouse=True, L=3, p=4, topk=1536, scorer="norm",
              selection="paper"):
        cp.check_context_parallel(cp_degree, world, gpu, N, lighthouse, L, p, topk, scorer, selection)

    check()  # config/paper_98k.py on 2 GPUs
    check(N=262144, topk=2048)
    check(cp_degree=4, world=8, N=65536, topk=2048)
    check(N=262144, lighthouse=False)  # a dense run needs only block_size in 2W chunks
    for kwargs, message in [
            (dict(world=3), "needs a multiple of 2 processes, got 3"),
            (dict(world=1), "torchrun --nproc_per_node=2"),
            (dict(gpu=False), "needs CUDA GPUs"),
            (dict(N=98306, lighthouse=False), "would work: block_size=98304 or 98308"),
            (dict(scorer="dilated"), "lh_scorer='dilated' cannot run under context_parallel"),
            (dict(selection="causal"), "lh_selection='causal' cannot run under context_parallel"),
            # 12 tiles cannot cut 16384 coarsest entries evenly
            (dict(N=262144), "would work: lh_topk=1024 or lh_topk=2048 or block_size=262080 or block_size=262272$"),
            (dict(cp_degree=4, world=4), "would work: lh_topk=1024 or lh_topk=2048$"),  # 12 tiles, 8 chunks
            (dict(N=98432, topk=2048), "would work: lh_topk=1024 or block_size=98304 or block_size=98560$")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
            check(**kwargs)
    for fix in (dict(N=262144, topk=1024), dict(N=262144, topk=2048), dict(N=262080), dict(N=262272),
                dict(cp_degree=4, world=4, topk=2048),
                dict(N=98432, topk=1024), dict(N=98560, topk=2048)):
        check(**fix)


def run_model(model, tokens, dtype, mesh=None):
    """One forward and backward of model on tokens (B, N + 1): (loss, logits (B, N, V), {name: grad}),
    each for the whole sequence. With mesh (a context-parallel group), under CP: the loss and
    gradients averaged over the group as train.py's DDP does, the logits gathered."""
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    model.zero_grad(set_to_none=True)
    with cp.sequence_sharded(model, mesh, x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits, loss = model(x, y)
        loss.backward()
    loss, grads = loss.detach(), {name: p.grad for name, p in model.named_parameters()}
    if mesh is not None:
        for t in [loss, *grads.values()]:
            dist.all_reduce(t)
            t /= mesh.size()
        shares = [torch.empty_like(logits) for _ in range(mesh.size())]
        dist.all_gather(shares, logits.contiguous())
        logits = cp.unshard(torch.stack(shares), mesh.size(), dim=1)
    return loss, logits.detach().float(), grads


def relative_error(a, b):
    """|a - b| / |b| (L2) over lists of tensors."""
    diff = sum((x.double() - y.double()).square().sum() for x, y in zip(a, b))
    return (diff / sum(y.double().square().sum() for y in b)).sqrt().item()


# (what, model settings). A Lighthouse layer first, then a dense one: ring attention's sums differ
# from one GPU's in rounding, and a Lighthouse layer after it could see two scores swap places (a
# different selection, no bug); the first sees the same inputs either way. 2 tiles per chunk.
GPU_MODELS = [
    ("norm", {}),
    ("span_end+gqa", dict(lh_rope="span_end", n_kv_head=2)),
    ("checkpointing", dict(activation_checkpointing=True, checkpoint_keep_attention=True)),
]


def model_worker(rank, world, rendezvous):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=rendezvous, rank=rank, world_size=world)
    try:
        mesh = cp.make_mesh(world, "cuda")
        N = 16384
        tokens = torch.randint(0, 257, (1, N + 1), generator=torch.Generator().manual_seed(0)).cuda()
        for what, settings in GPU_MODELS:
            config = GPTConfig(**{**dict(block_size=N, vocab_size=257, n_layer=2, n_head=4, n_kv_head=4, n_embd=256,
                                         ffn_hidden=512, dense_layers=[-1], lh_levels=3, lh_pool=4, lh_topk=1024),
                                  **settings})
            torch.manual_seed(0)
            model = GPT(config).cuda()
            for mode in ("lighthouse", "dense"):
                model.set_attention(mode)
                case = f"rank {rank}, {what}, {mode}"
                one, split = run_model(model, tokens, torch.float32), run_model(model, tokens, torch.float32, mesh)
                assert_near(split[0], one[0], FP32_TOL, f"{case}: fp32 loss")
                assert_near(split[1], one[1], FP32_TOL, f"{case}: fp32 logits")
                for name in one[2]:
                    assert_near(split[2][name], one[2][name], FP32_TOL, f"{case}: fp32 gradient of {name}")
                # bf16: CP is no further from the fp32 result than one GPU in bf16 is (2x, plus a floor)
                one16 = run_model(model, tokens, torch.bfloat16)
                split16 = run_model(model, tokens, torch.bfloat16, mesh)
                for kind, pick in (("logits", lambda run: [run[1]]), ("gradients", lambda run: list(run[2].values()))):
                    err_one, err_split = (relative_error(pick(run), pick(one)) for run in (one16, split16))
                    assert err_split <= 2 * err_one + 1e-3, \
                        f"{case}: bf16 {kind} off by {err_split:.3g}, one GPU's by {err_one:.3g}"
    finally:
        dist.destroy_process_group()


def test_trainer_checks_context_parallel_first(monkeypatch):
    """train.py refuses settings that cannot shard before any work, with the fix."""
    config = dict(train.DEFAULTS, context_parallel=2)
    with pytest.raises(SystemExit, match="config error: context_parallel=2 needs a multiple of 2 processes, got 1"):
        train.main(["--context_parallel=2"])
    with pytest.raises(train.ConfigError, match="needs CUDA GPUs"):
        train.validate(dict(config, device="cpu"), world_size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks that follow, on any machine
    with pytest.raises(train.ConfigError, match=r"cannot be cut into 2\*context_parallel = 4 chunks"):
        train.validate(dict(config, lh_topk=256, block_size=4096), world_size=2)  # 2 tiles, 4 chunks
    config.update(lh_topk=512, block_size=4096)
    train.validate(dict(config, gradient_accumulation_steps=2), world_size=4)  # 2 groups of 2
    with pytest.raises(train.ConfigError, match=r"multiple of the number of processes \(6 / context_parallel 2 = 3\)"):
        train.validate(dict(config, gradient_accumulation_steps=4), world_size=6)
    with pytest.raises(train.ConfigError, match=r"short_block_size=2 must be a multiple of 2\*context_parallel = 4"):
        train.validate(dict(config, short_context_iters=5, short_block_size=2), world_size=2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_model_on_two_gpus():
    """A whole model under CP=2 (NCCL, torch's ring attention) against one GPU, forward and backward,
    in both phases: fp32 to 1e-5; bf16 no further from the fp32 result than one GPU's bf16 is."""
    spawn(model_worker, 2)
