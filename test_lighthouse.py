"""
Tests of the Lighthouse layer: the Triton path against the plain-PyTorch reference, step by step
and whole, plus the properties the method promises (partition, order, causality, closed-form
scatter) and the domain errors.

    python -m pytest -q                       # CPU: Triton interpreter, fp32, small shapes
    python -m pytest -q test_lighthouse.py    # on a GPU the same file also runs bf16, long lengths
"""

import math

import pytest
import torch

import lighthouse_kernel as lk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# (B, H, H_kv, N, D, levels, pool, topk)
CPU_CASES = [
    (1, 4, 2, 2048, 16, 2, 4, 128),  # one tile, GQA 2:1
    (2, 4, 2, 1036, 16, 3, 2, 256),  # two tiles, ragged last tile (259 = 129 + 130 coarsest entries)
    (1, 2, 1, 2560, 32, 3, 4, 128),  # all query heads share one kv head
    (1, 3, 3, 1048, 24, 4, 2, 128),  # four levels, head dim not a power of two
]
GPU_CASES = [
    (2, 8, 2, 16384, 128, 3, 4, 256),
    (1, 8, 8, 32768, 128, 3, 4, 1536),  # 12 ragged tiles: breaks the authors' code
    (1, 4, 4, 33360, 64, 3, 4, 1536),
]
CASES = CPU_CASES + (GPU_CASES if CUDA else [])
FP32_TOL = 1e-5  # relative error between paths that differ only in summation order
BF16_TOL = 1e-2  # relative error of the bf16 Triton path against the fp32 reference


def case_id(case):
    B, H, G, N, D, L, p, K = case
    return f"B{B}-H{H}-kv{G}-N{N}-D{D}-L{L}-p{p}-k{K}"


def random_qkv(case, dtype=torch.float32, seed=None, requires_grad=False):
    """Fresh random q, k, v (never zeros) with row norms that vary, as after RoPE."""
    B, H, G, N, D, *_ = case
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(torch.seed() if seed is None else seed)

    def draw(heads):
        x = torch.randn(B, heads, N, D, generator=gen, device=DEVICE)
        scale = torch.rand(B, heads, N, 1, generator=gen, device=DEVICE) * 2 + 0.5
        return (x * scale).to(dtype).requires_grad_(requires_grad)

    return draw(H), draw(G), draw(G)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def spans(indices, N, levels, pool):
    """Decode pyramid indices (..., M) into (level, start, end) of each entry's token span."""
    offsets, _ = lk.level_offsets(N, levels, pool)
    level = torch.zeros_like(indices)
    for lvl in range(1, levels):
        level += (indices >= offsets[lvl]).long()
    start_of_level = torch.tensor(offsets, device=indices.device)[level]
    size = pool**level
    start = (indices - start_of_level) * size
    return level, start, start + size


def coverage(start, end, N):
    """How many of the spans [start, end) contain each token: (N,)."""
    steps = torch.zeros(N + 1, dtype=torch.int64, device=start.device)
    steps.index_add_(0, start, torch.ones_like(start))
    steps.index_add_(0, end, -torch.ones_like(end))
    return steps.cumsum(0)[:N]


# -----------------------------------------------------------------------------
# Each step: Triton against the reference


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pyramid_and_scores_match_reference(case):
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    q_up, q_score = lk.triton_pyramid(q, G, L, p, with_scores=True)
    k_up, k_score = lk.triton_pyramid(k, G, L, p, with_scores=True)
    q_ref, k_ref = lk.ref_pyramid(q, L, p), lk.ref_pyramid(k, L, p)
    assert rel_err(q_up, q_ref[:, :, N:]) < FP32_TOL
    assert rel_err(k_up, k_ref[:, :, N:]) < FP32_TOL
    q_tok, k_tok = lk.ref_token_scores(q, k)
    # the scores must be bitwise equal, or the two paths could select different entries
    assert torch.equal(q_score, lk.ref_score_pyramid(q_tok, L, p))
    assert torch.equal(k_score, lk.ref_score_pyramid(k_tok, L, p))


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "many-ties"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_selection_matches_reference(case, ties):
    B, H, G, N, D, L, p, K = case
    q_scores = torch.rand(B, G, N, device=DEVICE) * 10
    k_scores = torch.rand(B, G, N, device=DEVICE) * 10
    if ties:  # only 8 distinct values: the lower index must win every tie, in both paths
        q_scores, k_scores = q_scores.floor(), k_scores.floor()
    ours = lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="triton")
    ref = lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="torch")
    assert ours.dtype == torch.int64 and ours.shape == (B, G, lk.gathered_length(N, L, p, K))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gather_and_scatter_match_reference(case):
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case, requires_grad=True)
    q_scores, k_scores = lk.ref_token_scores(q, k)
    idx = lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="torch")
    _, P = lk.level_offsets(N, L, p)
    inv = lk.inverse_map(idx, P)
    # gather (q: one row per head; k: each kv head fanned out to its group's query heads)
    for x in (q, k):
        ours = lk._PyramidGather.apply(x, lk.triton_pyramid(x, G, L, p, False)[0], idx, inv, H, L, p)
        ref = lk.ref_gather(lk.ref_pyramid(x, L, p), idx).repeat_interleave(H // x.shape[1], dim=1)
        assert rel_err(ours, ref) < FP32_TOL
        w = torch.randn_like(ref)
        (d_ours,) = torch.autograd.grad((ours * w).sum(), x)
        (d_ref,) = torch.autograd.grad((ref * w).sum(), x)
        assert rel_err(d_ours, d_ref) < FP32_TOL
    # scatter
    attn = torch.randn(B, H, idx.shape[2], D, device=DEVICE, requires_grad=True)
    ours = lk._CausalScatter.apply(attn, idx, inv, N, L, p)
    ref = lk.ref_scatter(attn, inv, N, L, p)
    assert rel_err(ours, ref) < FP32_TOL
    w = torch.randn_like(ref)
    (d_ours,) = torch.autograd.grad((ours * w).sum(), attn)
    (d_ref,) = torch.autograd.grad((ref * w).sum(), attn)
    assert rel_err(d_ours, d_ref) < FP32_TOL


# -----------------------------------------------------------------------------
# The whole layer


def check_layer(case, dtype, tol):
    q, k, v = random_qkv(case, dtype=dtype, requires_grad=True)
    B, H, G, N, D, L, p, K = case
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl="triton")
    assert out.shape == q.shape and out.dtype == dtype
    # the reference runs in fp32 on the same (possibly bf16-rounded) inputs
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = lk.lighthouse_attention(q32, k32, v32, L, p, K, impl="torch")
    assert rel_err(out, ref) < tol
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q32, k32, v32))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, g_ref) < tol, name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_matches_reference_fp32(case):
    check_layer(case, torch.float32, FP32_TOL if not CUDA else 1e-4)


@gpu_only
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_matches_reference_bf16(case):
    check_layer(case, torch.bfloat16, BF16_TOL)


def test_layer_on_text_like_inputs_matches_reference():
    """Text repeats tokens and RoPE keeps norms, so all occurrences of a token tie, at every level
    of both score pyramids. The whole layer must still match the reference."""
    from model import apply_rope, rope_tables
    H, G, N, D, L, p, K = 2, 1, 4096, 16, 3, 4, 256
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (N,), generator=gen)  # a 6-token vocabulary: ties everywhere
    table = torch.randn(3, 6, H, D, generator=gen)  # q, k, v vectors per (token, head)
    q, k, v = (x[tokens].transpose(0, 1).unsqueeze(0) for x in table)  # (N, H, D) -> (1, H, N, D) each
    k, v = k[:, :G], v[:, :G]  # (1, G, N, D)
    cos, sin = rope_tables(D, N, 10000.0)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (x.to(DEVICE).contiguous().requires_grad_() for x in (q, k, v))
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl="triton")
    ref = lk.lighthouse_attention(q, k, v, L, p, K, impl="torch")
    tol = FP32_TOL if not CUDA else 1e-4
    assert rel_err(out, ref) < tol
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_err(g, g_ref) < tol, name


def test_default_impl_follows_device():
    case = CPU_CASES[0]
    q, k, v = random_qkv(case)
    _, _, _, _, _, L, p, K = case
    expected = lk.lighthouse_triton(q, k, v, L, p, K) if CUDA else lk.lighthouse_reference(q, k, v, L, p, K)
    assert torch.equal(lk.lighthouse_attention(q, k, v, L, p, K), expected)
    with pytest.raises(ValueError, match="impl"):
        lk.lighthouse_attention(q, k, v, L, p, K, impl="cuda")


# -----------------------------------------------------------------------------
# What the selection promises


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_selection_properties(case):
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    q_scores, k_scores = lk.ref_token_scores(q, k)
    idx = lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="triton")
    M = N // p ** (L - 1) + (L - 1) * p * K
    assert idx.shape == (B, G, M)
    level, start, end = spans(idx, N, L, p)
    for b in range(B):
        for g in range(G):
            e, lvl, s, t = idx[b, g], level[b, g], start[b, g], end[b, g]
            assert e.unique().numel() == M  # no entry twice
            assert (lvl == 0).sum() == K * p  # exactly topk * p tokens at full resolution
            # leaves: selected entries none of whose children is selected
            selected = set(e.tolist())
            offsets, _ = lk.level_offsets(N, L, p)
            refined = torch.tensor([
                lv > 0 and (offsets[lv - 1] + (i - offsets[lv]) * p) in selected
                for i, lv in zip(e.tolist(), lvl.tolist())], device=idx.device)
            assert (coverage(s[~refined], t[~refined], N) == 1).all()  # the leaves partition [0, N)
            depth = coverage(s, t, N)
            assert depth.min() >= 1 and depth.max() <= L  # each token in 1..L selected entries
            assert (t[1:] >= t[:-1]).all()  # causal order: span ends never decrease


def test_paper_example_sizes():
    # at N = 98304, L = 3, p = 4, topk = 1536 attention runs on 18.75% of the length
    M = lk.check_lighthouse_config(98304, 3, 4, 1536)
    assert M == 18432 and M / 98304 == 0.1875


# -----------------------------------------------------------------------------
# The scatter, in closed form


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_scatter_closed_form(impl):
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    idx = lk.lighthouse_select(*lk.ref_token_scores(q, k), L, p, K, impl="torch")
    _, P = lk.level_offsets(N, L, p)
    inv = lk.inverse_map(idx, P)
    attn = torch.randn(B, H, idx.shape[2], D, device=DEVICE)
    if impl == "torch":
        out = lk.ref_scatter(attn, inv, N, L, p)
    else:
        out = lk._CausalScatter.apply(attn, idx, inv, N, L, p)
    # out[t] = sum over levels of the output of the most recently completed selected span
    expected = torch.zeros_like(out)
    position = {(b, g, e): m for b in range(B) for g in range(G) for m, e in enumerate(idx[b, g].tolist())}
    offsets, _ = lk.level_offsets(N, L, p)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(N):
                for lvl in range(L):
                    j = (t + 1) // p**lvl - 1
                    m = position.get((b, g, offsets[lvl] + j)) if j >= 0 else None
                    if m is not None:
                        expected[b, h, t] += attn[b, h, m]
    assert rel_err(out, expected) < FP32_TOL


# -----------------------------------------------------------------------------
# Causality


def causal_leak(out, inputs, t0):
    """Largest |gradient| of the outputs at positions <= t0 w.r.t. any input after t0."""
    w = torch.randn_like(out[:, :, : t0 + 1])
    grads = torch.autograd.grad((out[:, :, : t0 + 1] * w).sum(), inputs, retain_graph=True)
    return max(g[:, :, t0 + 1:].abs().max().item() for g in grads)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradient_causality(impl):
    case = CPU_CASES[1]  # two tiles, three levels
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case, requires_grad=True)

    out = lk.lighthouse_attention(q, k, v, L, p, K, impl=impl)
    for t0 in [0, 2, p ** (L - 1) - 1, 517, 518, N - 2]:
        assert causal_leak(out, (q, k, v), t0) == 0.0, f"output at <= {t0} depends on a later input"


def test_unshifted_scatter_is_caught():
    """The causality test can fail: scattering an entry to its own span [a, a+c) instead of
    [a+c-1, a+2c-1) lets a token see the rest of its span."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case, requires_grad=True)

    def unshifted_layer(q, k, v):
        idx = lk.lighthouse_select(*lk.ref_token_scores(q, k), L, p, K, impl="torch")
        inv = lk.inverse_map(idx, lk.level_offsets(N, L, p)[1])
        sel = [lk.ref_gather(lk.ref_pyramid(x, L, p), idx).repeat_interleave(H // x.shape[1], 1) for x in (q, k, v)]
        attn = torch.nn.functional.scaled_dot_product_attention(*sel, is_causal=True)
        out = 0
        for lvl, off in enumerate(lk.level_offsets(N, L, p)[0]):
            pos = inv[:, :, off + torch.arange(N, device=DEVICE) // p**lvl]  # wrong: no shift
            pos = pos.repeat_interleave(H // G, 1)
            out = out + attn.gather(2, pos.clamp(min=0)[..., None].expand(-1, -1, -1, D)) * (pos >= 0)[..., None]
        return out

    assert causal_leak(unshifted_layer(q, k, v), (q, k, v), t0=517) > 0


def test_selection_leak_stays_inside_its_tile():
    """The documented leak: whether a span is refined depends on later tokens of the same tile,
    so an output can change when a later token in its tile changes. It never crosses a tile."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    tile_tokens = (N // p ** (L - 1)) // (K // 128) * p ** (L - 1)  # tokens in the first tile: 516
    q, k, v = random_qkv(case, seed=1)
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl="torch")

    # a huge key late in tile 0 makes its coarse span win a k-score slot, moving earlier outputs
    k2 = k.clone()
    k2[:, :, 500] *= 100
    out2 = lk.lighthouse_attention(q, k2, v, L, p, K, impl="torch")
    assert not torch.allclose(out[:, :, :499], out2[:, :, :499])  # the leak exists

    # the same change in tile 1 leaves every output before tile 1 untouched
    q3, k3, v3 = q.clone(), k.clone(), v.clone()
    for x in (q3, k3, v3):
        x[:, :, tile_tokens:] = torch.randn_like(x[:, :, tile_tokens:]) * 10
    out3 = lk.lighthouse_attention(q3, k3, v3, L, p, K, impl="torch")
    assert torch.equal(out[:, :, :tile_tokens], out3[:, :, :tile_tokens])


# -----------------------------------------------------------------------------
# Domain errors


@pytest.mark.parametrize("args, message", [
    (dict(seq_len=2048, levels=1, pool=4, topk=128), "levels must be an integer >= 2"),
    (dict(seq_len=2048, levels=2, pool=3, topk=128), "pool must be a power of two .* nearest valid: 4"),
    (dict(seq_len=2048, levels=2, pool=4, topk=200), "topk must be a positive multiple of 128 .* nearest valid: 256"),
    (dict(seq_len=2048, levels=2, pool=4, topk=0), "topk must be a positive multiple of 128"),
    (dict(seq_len=1024, levels=3, pool=4, topk=128), "smallest valid sequence length is 2048"),
    (dict(seq_len=2050, levels=2, pool=4, topk=128), "multiple of pool\\^\\(levels-1\\) = 4 .* nearest valid: 2048 or 2052"),
    (dict(seq_len=16384, levels=3, pool=4, topk=2048), "smallest valid sequence length is 32768"),
    (dict(seq_len=2048, levels=2, pool=4, topk=128, n_head=6, n_kv_head=4), "nearest valid n_kv_head: 3"),
])
def test_bad_config_raises(args, message):
    with pytest.raises(ValueError, match=message):
        lk.check_lighthouse_config(**args)


def test_valid_configs_pass():
    assert lk.check_lighthouse_config(524288, 3, 4, 2048) == 32768 + 2 * 4 * 2048
    assert lk.check_lighthouse_config(32768, 3, 4, 1536) == 2048 + 2 * 4 * 1536
    assert lk.check_lighthouse_config(2048, 2, 4, 128, n_head=8, n_kv_head=2) == 1024


def test_bad_tensors_raise():
    q, k, v = random_qkv(CPU_CASES[0])
    with pytest.raises(ValueError, match="k and v must match q"):
        lk.lighthouse_attention(q, k[:, :, :1024], v[:, :, :1024], 2, 4, 128)
    with pytest.raises(ValueError, match="expected q"):
        lk.lighthouse_attention(q[0], k, v, 2, 4, 128)
    with pytest.raises(ValueError, match="smallest valid sequence length is 4096"):
        lk.lighthouse_attention(q, k, v, 2, 4, 1024)
    with pytest.raises(ValueError, match="n_kv_head"):
        lk.lighthouse_attention(q[:, :3], k, v, 2, 4, 128)


# -----------------------------------------------------------------------------
# GPU only: determinism and the lengths that break the authors' code


@gpu_only
def test_triton_is_deterministic():
    """Every Triton stage gives bitwise-identical results on repeated calls (no atomics).

    The attention core is not ours: cuDNN's SDPA backward accumulates dq in an order that varies
    between runs (measured on an H200, also under torch.use_deterministic_algorithms), so the
    whole layer is checked forward only and its stages one by one, backward included."""
    case = GPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case, dtype=torch.bfloat16)
    d_out = torch.randn_like(q)

    def stages():
        q_up, q_score = lk.triton_pyramid(q, G, L, p, with_scores=True)
        k_up, k_score = lk.triton_pyramid(k, G, L, p, with_scores=True)
        idx, inv = lk.triton_select(q_score, k_score, N, L, p, K)
        qq = q.detach().requires_grad_()
        q_sel = lk._PyramidGather.apply(qq, q_up, idx, inv, H, L, p)
        (dq,) = torch.autograd.grad(q_sel, qq, q_sel * 3)
        attn = q_sel.detach().requires_grad_()
        out = lk._CausalScatter.apply(attn, idx, inv, N, L, p)
        (d_attn,) = torch.autograd.grad(out, attn, d_out)
        layer = lk.lighthouse_attention(q, k, v, L, p, K, impl="triton")
        return q_up, q_score, k_up, k_score, idx, inv, q_sel, dq, out, d_attn, layer

    first = stages()
    for _ in range(2):
        for a, b in zip(first, stages()):
            assert torch.equal(a, b)


@gpu_only
@pytest.mark.parametrize("N, K", [(524288, 2048), (32768, 1536)])
def test_long_lengths_that_break_the_authors_code(N, K):
    case = (1, 2, 1, N, 128, 3, 4, K)
    q, k, _ = random_qkv(case, dtype=torch.bfloat16)
    scores = lk.ref_token_scores(q, k)
    idx = lk.lighthouse_select(*scores, 3, 4, K, impl="triton")
    assert torch.equal(idx, lk.lighthouse_select(*scores, 3, 4, K, impl="torch"))
    level, start, end = spans(idx[0, 0], N, 3, 4)
    assert (end[1:] >= end[:-1]).all() and (level == 0).sum() == 4 * K
    check_layer(case, torch.bfloat16, BF16_TOL)
