"""
Tests of the Lighthouse layer: the Triton path against the plain-PyTorch reference, step by step
and whole, for both scorers and both RoPE placements, plus the properties the method promises
(partition, order, causality, closed-form scatter), the domain errors and the launch limits.

    python -m pytest -q                       # CPU: Triton interpreter, fp32, small shapes
    python -m pytest -q test_lighthouse.py    # on a GPU the same file also runs bf16, long lengths
"""

import math

import pytest
import torch

import lighthouse_kernel as lk
from model import rope_tables

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
fp8_only = pytest.mark.skipif(not (CUDA and lk._has_fp8(torch.device("cuda"))),
                              reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9)")

# (B, H, H_kv, N, D, levels, pool, topk)
CPU_CASES = [
    (2, 4, 2, 2048, 16, 2, 4, 128),  # one tile, GQA 2:1, two sequences
    (1, 4, 2, 1036, 16, 3, 2, 256),  # two tiles, ragged last tile (259 = 129 + 130 coarsest entries)
    (1, 2, 1, 2560, 32, 3, 4, 128),  # all query heads share one kv head
    (1, 3, 3, 1048, 24, 4, 2, 128),  # four levels, head dim not a power of two
]
GPU_CASES = [
    (2, 8, 2, 16384, 128, 3, 4, 256),
    (1, 8, 8, 32768, 128, 3, 4, 1536),  # 12 ragged tiles: breaks the authors' code
    (1, 4, 4, 33360, 64, 3, 4, 1536),
]
CASES = CPU_CASES + (GPU_CASES if CUDA else [])
# (scorer, RoPE at the span end?, selection)
VARIANTS = [("norm", False, "paper"), ("norm", True, "paper"), ("dilated", False, "paper"), ("dilated", True, "paper"),
            ("norm", False, "causal"), ("dilated", True, "causal")]
FP32_TOL = 1e-5  # relative error between paths that differ only in summation order
BF16_TOL = 1e-2  # relative error of the bf16 Triton path against the fp32 reference


def case_id(case):
    B, H, G, N, D, L, p, K = case
    return f"B{B}-H{H}-kv{G}-N{N}-D{D}-L{L}-p{p}-k{K}"


def variant_id(variant):
    scorer, span_end, selection = variant
    return scorer + ("-span_end" if span_end else "") + ("-causal" if selection == "causal" else "")


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


def tables(N, D):
    """The model's RoPE tables (cos, sin), each (N, D/2), on DEVICE."""
    return tuple(t.to(DEVICE) for t in rope_tables(D, N, 10000.0))


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


def reference_selection(q, k, case):
    """The reference's selection from the norms of q, k: indices (B, G, M) and inverse map (B, G, P)."""
    B, H, G, N, D, L, p, K = case
    idx = lk.lighthouse_select(*lk.ref_norm_scores(q, k), L, p, K, impl="torch")
    return idx, lk.inverse_map(idx, lk.level_offsets(N, L, p)[1])


def shared_dilated_scores(monkeypatch):
    """Let the Triton path use the reference's dilated scores (fp32). The two compute the same
    scores only up to rounding, and a near-tie could then select differently; this isolates
    the rest of the layer. The scores themselves are compared in test_dilated_scores_*."""
    monkeypatch.setattr(lk, "triton_dilated_scores",
                        lambda q, k, v, dilation: lk.ref_dilated_scores(q.float(), k.float(), v.float(), dilation))


# -----------------------------------------------------------------------------
# Each step: Triton against the reference


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_norm_scores_match_reference(case):
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    # the scores must be bitwise equal, or the two paths could select different entries
    for ours, ref in zip(lk.triton_norm_scores(q, k, L, p), lk.ref_norm_scores(q, k)):
        assert torch.equal(ours, lk.ref_score_pyramid(ref, L, p))


@pytest.mark.parametrize("L, p", [(3, 4), (4, 4)])
def test_small_blocks_match_reference(monkeypatch, L, p):
    """With 8 rows per program: the score pyramid comes from the token scores level by level
    (p^(L-1) > 8 tokens per span), and each block of 8 gathered entries averages spans of up to
    p^(L-1) = 16 or 64 tokens, as many as its widest entry has (x laid out as (B, N, H, D) too)."""
    monkeypatch.setattr(lk, "ROWS", 8)
    case = (2, 4, 2, 256, 16, L, p, 128)
    q, k, _ = random_qkv(case)
    for ours, ref in zip(lk.triton_norm_scores(q, k, L, p), lk.ref_norm_scores(q, k)):
        assert torch.equal(ours, lk.ref_score_pyramid(ref, L, p))
    gather_case = (1, 2, 1, 128 * p ** (L - 1), 16, L, p, 128)  # the shortest sequence the selection allows
    q, k, _ = random_qkv(gather_case)
    idx, inv = reference_selection(q, k, gather_case)
    idx = idx[:, :, ::7].contiguous()  # every 7th entry: blocks of 8 that mix the levels, in a few programs
    for x in (q, k.transpose(1, 2).contiguous().transpose(1, 2)):
        ref = lk.ref_gather(lk.ref_pyramid(x, L, p), idx)
        assert rel_err(lk.triton_gather(x, idx, inv, L, p), ref) < FP32_TOL


def test_dilated_scores_reference_equals_a_naive_loop():
    """ref_dilated_scores against the definition, one (head, position) at a time."""
    B, H, G, N, D, dilation = 1, 4, 2, 24, 8, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, N, D, generator=gen), torch.randn(B, G, N, D, generator=gen), \
        torch.randn(B, G, N, D, generator=gen)
    q_score, k_score = lk.ref_dilated_scores(q, k, v, dilation)
    expected_q, expected_k = torch.zeros(B, H, N), torch.zeros(B, H, N)
    for h in range(H):
        g = h // (H // G)
        for t in range(N):
            s = torch.arange(t % dilation, t + 1, dilation)  # t's phase, up to t
            weights = torch.softmax(k[0, g, s] @ q[0, h, t] / math.sqrt(D), dim=0)
            expected_q[0, h, t] = (weights @ v[0, g, s]).norm()
            weights = torch.softmax(q[0, h, s] @ k[0, g, t] / math.sqrt(D), dim=0)
            expected_k[0, h, t] = (weights @ v[0, g, s]).norm()
    expected_q, expected_k = (x.view(B, G, H // G, N).amax(2) for x in (expected_q, expected_k))
    assert rel_err(q_score, expected_q) < FP32_TOL and rel_err(k_score, expected_k) < FP32_TOL


@pytest.mark.parametrize("kernel", ["fused", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []), ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_dilated_scores_match_reference(case, dtype, kernel):
    """The fused kernel (matrix products in the inputs' dtype) and its SDPA twin."""
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case, dtype=dtype)
    ours = lk.triton_dilated_scores(q, k, v, 4, kernel)
    ref = lk.ref_dilated_scores(q.float(), k.float(), v.float(), 4)
    for o, r in zip(ours, ref):
        assert o.dtype == torch.float32 and o.shape == (B, G, N)
        assert rel_err(o, r) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_fused_dilated_scores_in_small_blocks(monkeypatch, dilation):
    """With blocks of 32 query rows and 16 keys, a phase of 200 / dilation positions spans several
    blocks and ends inside one (no length is a multiple of 32), so the blocks before the diagonal,
    the diagonal's two key blocks and the masked tail all run; GQA 2:1, and q, k, v laid out as
    (B, N, H, D) in memory, as the model makes them."""
    monkeypatch.setattr(lk, "DILATED_BLOCK_M", 32)
    monkeypatch.setattr(lk, "DILATED_BLOCK_N", 16)
    case = (1, 4, 2, 200, 16, 2, 4, 128)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in random_qkv(case))  # (B, h, N, D) views
    ours = lk.triton_dilated_scores(q, k, v, dilation, "fused")
    ref = lk.ref_dilated_scores(q, k, v, dilation)
    for o, r in zip(ours, ref):
        assert rel_err(o, r) < FP32_TOL


def fp8_rounded(x):
    """x as the FP8 kernel sees it: scaled by its per-head power of two, rounded to e4m3, scaled back."""
    scale = lk._fp8_scales(x)[..., None, None]  # (B, h, 1, 1)
    return (x.float() * scale).to(torch.float8_e4m3fn).float() / scale


@fp8_only
@pytest.mark.parametrize("case", GPU_CASES[:1] + CPU_CASES[:2], ids=case_id)
def test_fp8_dilated_scores_match_reference_on_rounded_inputs(case):
    """The FP8 kernel against the reference given the same e4m3-rounded q, k, v: what is left is
    the rounding of the softmax weights (0.3-0.4% in a CPU emulation with torch's float8_e4m3fn),
    while the rounding of q and k alone moves the scores by 4-5% on these inputs."""
    q, k, v = random_qkv(case, dtype=torch.bfloat16)
    ours = lk.triton_dilated_scores(q, k, v, 4, "fp8")
    ref = lk.ref_dilated_scores(*(fp8_rounded(x) for x in (q, k, v)), 4)
    for o, r in zip(ours, ref):
        assert rel_err(o, r) < BF16_TOL


@fp8_only
def test_fp8_scores_select_what_bf16_scores_select():
    """The fraction of the layer's selection (the paper's) that FP8 scores and bf16 scores agree on.

    The issue's target is >= 0.99 on a trained checkpoint's activations (bench.py
    --mode=fp8_agreement measures that). On these i.i.d. random inputs a CPU emulation of the same
    rounding (torch's float8_e4m3fn) agrees on 0.954 (3 seeds, all within 0.001), not 0.99: the
    scores of random inputs lie close together, and the 4-5% that FP8 moves them reorders some.
    Unrelated scores agree on 0.43, so the bound below still catches FP8 gone wrong."""
    case = GPU_CASES[0]
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case, dtype=torch.bfloat16, seed=0)
    fp8, bf16 = (lk.lighthouse_select(*lk.triton_dilated_scores(q, k, v, 4, kernel), L, p, K)
                 for kernel in ("fp8", "fused"))  # (B, G, M) each
    agree = sum(torch.isin(a, b).sum().item() for a, b in zip(fp8.flatten(0, 1), bf16.flatten(0, 1))) / fp8.numel()
    print(f"FP8 and bf16 scores agree on {agree:.4f} of the selection")
    assert agree >= 0.93


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "many-ties"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_selection_matches_reference(case, ties):
    B, H, G, N, D, L, p, K = case
    q_scores = torch.rand(B, G, N, device=DEVICE) * 10
    k_scores = torch.rand(B, G, N, device=DEVICE) * 10
    if ties:  # only 10 distinct values: the lower index must win every tie, in both paths
        q_scores, k_scores = q_scores.floor(), k_scores.floor()
    ours = lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="triton")
    ref = lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="torch")
    assert ours.dtype == torch.int64 and ours.shape == (B, G, lk.gathered_length(N, L, p, K))
    assert torch.equal(ours, ref)


def test_selection_in_chunks_matches_reference(monkeypatch):
    """Tiles longer than SELECT_CHUNK are read chunk by chunk (any tile size fits a program); a
    chunk of 128 makes every list of this case (ragged tiles of 129 and 130 entries, 256
    candidates at each finer level) span two chunks."""
    B, G, N, L, p, K = 1, 1, 1036, 3, 2, 256
    monkeypatch.setattr(lk, "SELECT_CHUNK", 128)
    q_scores, k_scores = torch.rand(B, G, N, device=DEVICE), torch.rand(B, G, N, device=DEVICE).floor()
    assert torch.equal(lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="triton"),
                       lk.lighthouse_select(q_scores, k_scores, L, p, K, impl="torch"))


@pytest.mark.parametrize("kind", ["negative", "all -0.0", "signed zeros and infinities"])
def test_selection_orders_every_float(kind):
    """lighthouse_select is public: any non-NaN scores are ordered as the reference orders them."""
    B, G, N, L, p, K = 1, 2, 2048, 2, 4, 128
    scores = torch.randn(2, B, G, N, device=DEVICE) * 5
    if kind == "negative":
        scores = -scores.abs()
    elif kind == "all -0.0":
        scores = torch.full_like(scores, -0.0)
    else:
        specials = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), -1e-38, 1e-38], device=DEVICE)
        picks = torch.randint(0, len(specials), scores.shape, device=DEVICE)
        scores = torch.where(torch.rand_like(scores) < 0.7, specials[picks], scores)
    assert torch.equal(lk.lighthouse_select(*scores, L, p, K, impl="triton"),
                       lk.lighthouse_select(*scores, L, p, K, impl="torch"))
    with pytest.raises(ValueError, match="NaN"):
        lk.lighthouse_select(scores[0].clone().fill_(float("nan")), scores[1], L, p, K, impl="triton")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gather_and_scatter_match_reference(case):
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case, requires_grad=True)
    idx, inv = reference_selection(q, k, case)
    cos, sin = tables(N, D)
    # gather (q: one row per query head; k: one per kv head; q laid out as (B, N, H, D)), plain and
    # rotated at the span end
    for x in (q, k, q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()):
        for rope in (None, (cos, sin)):
            ours = lk.triton_gather(x, idx, inv, L, p, *(rope or (None, None)))
            ref = lk.ref_gather(lk.ref_pyramid(x, L, p), idx)
            if rope is not None:
                ref = lk.ref_rope_at_span_end(ref, idx, cos, sin, N, L, p)
            assert rel_err(ours, ref) < FP32_TOL
            w = torch.randn_like(ref)
            (d_ours,) = torch.autograd.grad((ours * w).sum(), x)
            (d_ref,) = torch.autograd.grad((ref * w).sum(), x)
            assert rel_err(d_ours, d_ref) < FP32_TOL
    # scatter, with the gradient laid out as the model's is: (B, N, H, D) in memory
    attn = torch.randn(B, H, idx.shape[2], D, device=DEVICE, requires_grad=True)
    ours = lk.triton_scatter(attn, idx, inv, N, L, p)
    ref = lk.ref_scatter(attn, inv, N, L, p)
    assert rel_err(ours, ref) < FP32_TOL
    w = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)
    (d_ours,) = torch.autograd.grad(ours, attn, w)
    (d_ref,) = torch.autograd.grad(ref, attn, w)
    assert rel_err(d_ours, d_ref) < FP32_TOL


def test_span_end_rotation_at_level_zero_is_ordinary_rope():
    """A selected token (level 0) is rotated at its own position, exactly as RoPE before pooling."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    idx, inv = reference_selection(q, k, case)
    cos, sin = tables(N, D)
    rotated_at_span_end = lk.triton_gather(q, idx, inv, L, p, cos, sin)  # (B, H, M, D)
    rotated_first = lk.triton_gather(lk.rope_rotate(q, cos, sin), idx, inv, L, p, None, None)
    tokens = (idx < N).repeat_interleave(H // G, dim=1)  # level-0 entries, per query head
    assert tokens.sum() == B * H * K * p
    assert rel_err(rotated_at_span_end[tokens], rotated_first[tokens]) < FP32_TOL


def test_span_end_with_norm_scores_selects_what_before_pool_selects():
    """Norms are rotation-invariant, so with the norm scorer the raw q, k of RoPE at the span end
    select exactly what the rotated q, k select. Rotations by quarter turns keep every value
    exact, so exactly means bitwise here."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case)
    angles = torch.randint(0, 4, (N, D // 2), device=DEVICE) * (math.pi / 2)
    cos, sin = angles.cos().round(), angles.sin().round()  # exactly 0 or +-1
    q_rot, k_rot = lk.rope_rotate(q, cos, sin), lk.rope_rotate(k, cos, sin)
    raw, rotated = lk.ref_token_scores(q, k, v), lk.ref_token_scores(q_rot, k_rot, v)
    assert all(torch.equal(a, b) for a, b in zip(raw, rotated))
    assert torch.equal(lk.lighthouse_select(*raw, L, p, K), lk.lighthouse_select(*rotated, L, p, K))
    raw, rotated = lk.triton_score_pyramids(q, k, v, L, p), lk.triton_score_pyramids(q_rot, k_rot, v, L, p)
    assert all(torch.equal(a, b) for a, b in zip(raw, rotated))


# -----------------------------------------------------------------------------
# The whole layer


def check_layer(case, dtype, tol, scorer="norm", span_end=False, selection="paper"):
    q, k, v = random_qkv(case, dtype=dtype, requires_grad=True)
    B, H, G, N, D, L, p, K = case
    rope = tables(N, D) if span_end else None
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl="triton", scorer=scorer, rope=rope, selection=selection)
    assert out.shape == q.shape and out.dtype == dtype
    # the reference runs in fp32 on the same (possibly bf16-rounded) inputs
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = lk.lighthouse_attention(q32, k32, v32, L, p, K, impl="torch", scorer=scorer, rope=rope, selection=selection)
    assert rel_err(out, ref) < tol
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q32, k32, v32))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, g_ref) < tol, name


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_matches_reference_fp32(case, variant, monkeypatch):
    shared_dilated_scores(monkeypatch)
    check_layer(case, torch.float32, FP32_TOL if not CUDA else 1e-4, *variant)


@gpu_only
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_matches_reference_bf16(case, variant, monkeypatch):
    shared_dilated_scores(monkeypatch)
    check_layer(case, torch.bfloat16, BF16_TOL, *variant)


@pytest.mark.parametrize("kernel", ["fused", "sdpa"])
def test_dilated_layer_end_to_end(monkeypatch, kernel):
    """The Triton path with its own dilated scorer against the reference, unpatched. The inputs
    are fixed: the two scorers agree only up to rounding, and fresh inputs could hold a near-tie
    that selects differently (the scores are compared on fresh inputs above)."""
    monkeypatch.setattr(lk, "DILATED_KERNEL", kernel)
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case, seed=3)
    rope = tables(N, D)
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl="triton", scorer="dilated", rope=rope)
    ref = lk.lighthouse_attention(q, k, v, L, p, K, impl="torch", scorer="dilated", rope=rope)
    assert rel_err(out, ref) < (FP32_TOL if not CUDA else 1e-4)


def test_layer_on_text_like_inputs_matches_reference():
    """Text repeats tokens and RoPE keeps norms, so all occurrences of a token tie, at every level
    of both score pyramids. The whole layer must still match the reference."""
    H, G, N, D, L, p, K = 2, 1, 4096, 16, 3, 4, 256
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (N,), generator=gen)  # a 6-token vocabulary: ties everywhere
    table = torch.randn(3, 6, H, D, generator=gen)  # q, k, v vectors per (token, head)
    q, k, v = (x[tokens].transpose(0, 1).unsqueeze(0) for x in table)  # (N, H, D) -> (1, H, N, D) each
    k, v = k[:, :G], v[:, :G]  # (1, G, N, D)
    cos, sin = rope_tables(D, N, 10000.0)
    q, k = lk.rope_rotate(q, cos, sin), lk.rope_rotate(k, cos, sin)
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


def test_registered_ops_pass_opcheck():
    """The kernels' wrappers are torch ops (so torch.compile keeps each launch whole): their schemas
    and fake (shape-only) versions must agree with what they do, backward passes included. Their
    gradients come from autograd.Functions, checked against the reference in the layer tests."""
    case = (1, 2, 1, 512, 16, 2, 4, 128)
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case)
    scores = [lk.ref_score_pyramid(s, L, p) for s in lk.ref_norm_scores(q, k)]
    idx, inv = lk.triton_select(*scores, N, L, p, K)
    cos, sin = tables(N, D)
    M = idx.shape[2]
    attn, d_sel = torch.randn(B, H, M, D, device=DEVICE), torch.randn(B, H, M, D, device=DEVICE)
    d_out = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)  # as the model's gradient arrives
    tests = ("test_schema", "test_faketensor")
    for op, args in [
            (lk.triton_norm_scores, (q, k, L, p)),
            (lk._dilated_scores_op, (q, k, v, 4, "fused")),
            (lk.triton_select, (*scores, N, L, p, K)),
            (lk._gather_op, (q, idx, L, p, cos, sin)),
            (lk._gather_op, (k, idx, L, p, None, None)),
            (lk._gather_backward_op, (d_sel, inv, list(q.shape), True, L, p, cos, sin)),
            (lk._scatter_op, (attn, inv, N, L, p)),
            (lk._scatter_backward_op, (d_out, idx, L, p))]:
        torch.library.opcheck(op, args, test_utils=tests)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_layer_compiles_as_one_graph(variant):
    """torch.compile traces the Triton path without a graph break (fullgraph=True raises at one):
    the kernels are ops it keeps whole. The aot_eager backend runs the traced graph, forward
    and backward, without generating code, and must give what eager gives."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    scorer, span_end, selection = variant
    rope = tables(N, D) if span_end else None
    q, k, v = random_qkv(case, requires_grad=True)

    def layer(q, k, v):
        return lk.lighthouse_attention(q, k, v, L, p, K, impl="triton", scorer=scorer, rope=rope, selection=selection)

    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend="aot_eager")
    out, out_compiled = layer(q, k, v), compiled(q, k, v)
    assert torch.equal(out, out_compiled)
    w = torch.randn_like(out)
    for g, g_compiled in zip(torch.autograd.grad(out, (q, k, v), w), torch.autograd.grad(out_compiled, (q, k, v), w)):
        assert torch.equal(g, g_compiled)


# -----------------------------------------------------------------------------
# What the selection promises


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_selection_properties(case):
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    idx = lk.lighthouse_select(*lk.ref_norm_scores(q, k), L, p, K, impl="triton")
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
            assert torch.equal(lk.last_token(e, N, L, p), t - 1)  # span-end RoPE positions never decrease


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
    idx, inv = reference_selection(q, k, case)
    attn = torch.randn(B, H, idx.shape[2], D, device=DEVICE)
    if impl == "torch":
        out = lk.ref_scatter(attn, inv, N, L, p)
    else:
        out = lk.triton_scatter(attn, idx, inv, N, L, p)
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


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradient_causality(impl, variant):
    case = CPU_CASES[1]  # two tiles, three levels, GQA
    B, H, G, N, D, L, p, K = case
    scorer, span_end, selection = variant
    q, k, v = random_qkv(case, requires_grad=True)
    rope = tables(N, D) if span_end else None
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl=impl, scorer=scorer, rope=rope, selection=selection)
    for t0 in [p ** (L - 1) - 1, 517, N - 2]:  # the first coarse span's end, across the tile border, the end
        assert causal_leak(out, (q, k, v), t0) == 0.0, f"output at <= {t0} depends on a later input"


def test_unshifted_scatter_is_caught():
    """The causality test can fail: scattering an entry to its own span [a, a+c) instead of
    [a+c-1, a+2c-1) lets a token see the rest of its span."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, v = random_qkv(case, requires_grad=True)

    def unshifted_layer(q, k, v):
        idx = lk.lighthouse_select(*lk.ref_norm_scores(q, k), L, p, K, impl="torch")
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


def test_rotation_at_span_start_is_caught():
    """Rotating a node at the first token of its span instead of the last changes the function:
    the span-end test above pins down where the rotation happens."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    idx, inv = reference_selection(q, k, case)
    cos, sin = tables(N, D)
    ours = lk.triton_gather(q, idx, inv, L, p, cos, sin)
    level, start, _ = spans(idx.repeat_interleave(H // G, 1), N, L, p)
    at_start = lk.rope_rotate(lk.ref_gather(lk.ref_pyramid(q, L, p), idx), cos[start], sin[start])
    assert rel_err(ours[level > 0], at_start[level > 0]) > 1e-2
    assert rel_err(ours[level == 0], at_start[level == 0]) < FP32_TOL


@pytest.mark.parametrize("scorer", ["norm", "dilated"])
def test_selection_leak_stays_inside_its_tile(scorer):
    """The documented leak: whether a span is refined depends on later tokens of the same tile,
    so an output can change when a later token in its tile changes. It never crosses a tile."""
    case = CPU_CASES[1]
    B, H, G, N, D, L, p, K = case
    tile_tokens = lk.tiles(N, L, p, K)[1] * p ** (L - 1)  # tokens in the first tile: 516
    q, k, v = random_qkv(case, seed=1)
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl="torch", scorer=scorer)

    # a huge q and v late in tile 0 win their coarse span a q-score slot, moving earlier outputs
    q2, v2 = q.clone(), v.clone()
    q2[:, :, 500] *= 100
    v2[:, :, 500] *= 100
    out2 = lk.lighthouse_attention(q2, k, v2, L, p, K, impl="torch", scorer=scorer)
    assert not torch.allclose(out[:, :, :499], out2[:, :, :499])  # the leak exists

    # the same change in tile 1 leaves every output before tile 1 untouched
    q3, k3, v3 = q.clone(), k.clone(), v.clone()
    for x in (q3, k3, v3):
        x[:, :, tile_tokens:] = torch.randn_like(x[:, :, tile_tokens:]) * 10
    out3 = lk.lighthouse_attention(q3, k3, v3, L, p, K, impl="torch", scorer=scorer)
    assert torch.equal(out[:, :, :tile_tokens], out3[:, :, :tile_tokens])


# -----------------------------------------------------------------------------
# The causal selection (ours): no reading ahead


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[2] == "causal"] + [("norm", False, "paper")],
                         ids=variant_id)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_outputs_do_not_depend_on_later_inputs(impl, variant):
    """The gradient test above holds the selection fixed. Here the selection is recomputed:
    changing every input after t must leave the outputs up to t bit-identical. The causal
    selection passes; the paper's fails (it reads ahead within a tile)."""
    case = CPU_CASES[1]  # two tiles, three levels, GQA
    B, H, G, N, D, L, p, K = case
    scorer, span_end, selection = variant
    rope = tables(N, D) if span_end else None
    q, k, v = random_qkv(case)
    out = lk.lighthouse_attention(q, k, v, L, p, K, impl=impl, scorer=scorer, rope=rope, selection=selection)
    same = []
    for t in [2, 200, 515, 516, 800]:  # tile 0, its last token, tile 1's first, tile 1
        later = [x.clone() for x in (q, k, v)]
        for x in later:
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 3  # new, larger norms after t
        out2 = lk.lighthouse_attention(*later, L, p, K, impl=impl, scorer=scorer, rope=rope, selection=selection)
        same.append(torch.equal(out[:, :, :t + 1], out2[:, :, :t + 1]))
    assert all(same) if selection == "causal" else not all(same)


def causal_counts(idx, case):
    """Entries the causal selection took per (batch, kv head, tile, finer level): (B, G, T, L-1)."""
    B, H, G, N, D, L, p, K = case
    n_tiles, tile = lk.tiles(N, L, p, K)
    level, start, _ = spans(idx.clamp(min=0), N, L, p)
    in_tile = (start // (tile * p ** (L - 1))).clamp(max=n_tiles - 1)
    counts = torch.zeros(B, G, n_tiles, L - 1, dtype=torch.int64, device=idx.device)
    for lvl in range(L - 1):
        taken = (idx >= 0) & (level == lvl)
        counts[:, :, :, lvl] = torch.stack([(taken & (in_tile == t)).sum(-1) for t in range(n_tiles)], dim=-1)
    return counts


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_causal_selection_properties(case):
    B, H, G, N, D, L, p, K = case
    q, k, _ = random_qkv(case)
    idx = lk.lighthouse_select(*lk.ref_norm_scores(q, k), L, p, K, selection="causal")
    M = lk.gathered_length(N, L, p, K)
    assert idx.shape == (B, G, M)
    offsets, _ = lk.level_offsets(N, L, p)
    level, start, end = spans(idx.clamp(min=0), N, L, p)
    for b in range(B):
        for g in range(G):
            used = idx[b, g] >= 0
            n_used = int(used.sum())
            assert used[:n_used].all()  # the unused slots come last
            e = idx[b, g, :n_used]
            assert e.unique().numel() == n_used  # no entry twice
            top = e[level[b, g, :n_used] == L - 1]
            assert torch.equal(top.sort().values, torch.arange(offsets[-1], offsets[-1] + N // p ** (L - 1),
                                                               device=DEVICE))  # every coarsest entry
            t = end[b, g, :n_used]
            assert (t[1:] >= t[:-1]).all()  # causal order: span ends never decrease
    assert (causal_counts(idx, case) <= 128 * p).all()  # at most 128p per tile and finer level


def test_causal_selection_thresholds_come_from_the_tile_before():
    """When every tile repeats the scores of the first, each later tile takes exactly the 128p
    entries per finer level that its thresholds were made to pick; scores above everything in
    the tile before fill the budget with the tile's first entries, scores below take nothing."""
    case = (1, 2, 2, 8192, 16, 3, 4, 512)  # 4 tiles of 2048 tokens
    B, H, G, N, D, L, p, K = case
    n_tiles, tile = lk.tiles(N, L, p, K)
    width = tile * p ** (L - 1)  # tokens per tile
    gen = torch.Generator().manual_seed(0)
    pattern = torch.rand(2, B, G, width, generator=gen)  # q- and k-scores of one tile
    q_scores, k_scores = pattern.repeat(1, 1, 1, n_tiles).to(DEVICE)  # (B, G, N) each
    counts = causal_counts(lk.lighthouse_select(q_scores, k_scores, L, p, K, selection="causal"), case)
    assert (counts[:, :, 0] == 128 * p).all()  # tile 0: the first 128p entries, no threshold
    assert (counts[:, :, 1:] == 128 * p).all()

    q_scores[..., 2 * width:3 * width] += 10  # tile 2 above everything in tile 1
    q_scores[..., 3 * width:] -= 20  # tile 3 below everything in tile 2, and k-scores of tile 3 too
    k_scores[..., 3 * width:] -= 20
    idx = lk.lighthouse_select(q_scores, k_scores, L, p, K, selection="causal")
    counts = causal_counts(idx, case)
    assert (counts[:, :, 2] == 128 * p).all() and (counts[:, :, 3] == 0).all()
    level, start, _ = spans(idx.clamp(min=0), N, L, p)
    for g in range(G):
        for lvl in range(L - 1):
            in_tile_2 = (idx[0, g] >= 0) & (level[0, g] == lvl) & (start[0, g] >= 2 * width) & (start[0, g] < 3 * width)
            first = 2 * width + torch.arange(128 * p, device=DEVICE) * p**lvl  # the tile's first 128p entries
            assert torch.equal(start[0, g, in_tile_2].sort().values, first)


# -----------------------------------------------------------------------------
# Domain errors and limits


@pytest.mark.parametrize("args, message", [
    (dict(seq_len=2048, levels=1, pool=4, topk=128), "levels must be an integer >= 2"),
    (dict(seq_len=2048, levels=2, pool=3, topk=128), "pool must be a power of two .* nearest valid: 4"),
    (dict(seq_len=2048, levels=2, pool=4, topk=200), "topk must be a positive multiple of 128 .* nearest valid: 256"),
    (dict(seq_len=2048, levels=2, pool=4, topk=0), "topk must be a positive multiple of 128"),
    (dict(seq_len=1024, levels=3, pool=4, topk=128), "smallest valid sequence length is 2048"),
    (dict(seq_len=2050, levels=2, pool=4, topk=128), "multiple of pool\\^\\(levels-1\\) = 4 .* nearest valid: 2048 or 2052"),
    (dict(seq_len=16384, levels=3, pool=4, topk=2048), "smallest valid sequence length is 32768"),
    (dict(seq_len=2048, levels=2, pool=4, topk=128, n_head=6, n_kv_head=4), "nearest valid n_kv_head: 3"),
    (dict(seq_len=2048, levels=2, pool=4, topk=128, scorer="dilate"), "scorer must be one of 'norm', 'dilated'"),
    (dict(seq_len=2052, levels=2, pool=4, topk=128, scorer="dilated", dilation=8),
     "multiple of the dilated scorer's dilation 8: nearest valid lengths 2048 or 2056"),
    (dict(seq_len=2048, levels=2, pool=4, topk=128, scorer="dilated", dilation=0), "dilation must be an integer >= 1"),
    (dict(seq_len=2**30, levels=2, pool=4, topk=128), "largest valid length is 1073741820"),
])
def test_bad_config_raises(args, message):
    with pytest.raises(ValueError, match=message):
        lk.check_lighthouse_config(**args)


def test_valid_configs_pass():
    assert lk.check_lighthouse_config(524288, 3, 4, 2048) == 32768 + 2 * 4 * 2048
    assert lk.check_lighthouse_config(32768, 3, 4, 1536) == 2048 + 2 * 4 * 1536
    assert lk.check_lighthouse_config(2048, 2, 4, 128, n_head=8, n_kv_head=2) == 1024
    assert lk.check_lighthouse_config(2052, 2, 4, 128, scorer="dilated", dilation=4) == 2052 // 4 + 4 * 128


def test_bad_tensors_raise():
    q, k, v = random_qkv(CPU_CASES[0])
    cos, sin = tables(2048, 16)
    with pytest.raises(ValueError, match="k and v must match q"):
        lk.lighthouse_attention(q, k[:, :, :1024], v[:, :, :1024], 2, 4, 128)
    with pytest.raises(ValueError, match="expected q"):
        lk.lighthouse_attention(q[0], k, v, 2, 4, 128)
    with pytest.raises(ValueError, match="smallest valid sequence length is 4096"):
        lk.lighthouse_attention(q, k, v, 2, 4, 1024)
    with pytest.raises(ValueError, match="n_kv_head"):
        lk.lighthouse_attention(q[:, :3], k, v, 2, 4, 128)
    for impl in ("torch", "triton"):  # caught before any kernel runs
        with pytest.raises(ValueError, match="q, k, v must share a dtype"):
            lk.lighthouse_attention(q, k.double(), v.double(), 2, 4, 128, impl=impl)
        with pytest.raises(ValueError, match="k is on meta but q is on"):
            lk.lighthouse_attention(q, k.to("meta"), v, 2, 4, 128, impl=impl)
        with pytest.raises(ValueError, match="must be float32, float16 or bfloat16"):
            lk.lighthouse_attention(q.double(), k.double(), v.double(), 2, 4, 128, impl=impl)
        with pytest.raises(ValueError, match="rope cos table must be"):
            lk.lighthouse_attention(q, k, v, 2, 4, 128, impl=impl, rope=(cos[:1000], sin))
        with pytest.raises(ValueError, match="cos is on meta"):
            lk.lighthouse_attention(q, k, v, 2, 4, 128, impl=impl, rope=(cos.to("meta"), sin))


def test_bad_dilated_scorer_arguments_raise():
    q, k, v = random_qkv(CPU_CASES[0])  # N = 2048
    with pytest.raises(ValueError, match="kernel must be one of 'auto', 'fp8', 'fused', 'sdpa'"):
        lk.triton_dilated_scores(q, k, v, 4, "fp16")
    for dilation in (3, 0):
        with pytest.raises(ValueError, match=f"divides the sequence length 2048 \\(got {dilation}\\)"):
            lk.triton_dilated_scores(q, k, v, dilation, "fused")
    if not (CUDA and lk._has_fp8(q.device)):
        with pytest.raises(ValueError, match="needs a GPU with FP8 tensor cores .* to 'auto' or 'fused'"):
            lk.triton_dilated_scores(q, k, v, 4, "fp8")


def test_launch_grids_stay_within_cuda_limits():
    """CUDA allows 2^31 - 1 programs on grid axis 0 but only 65535 on axis 1. Row blocks go on
    axis 0: at N = 4,194,256 (L=3, p=4, topk=16384) there are 65,536 blocks of 64 tokens, which
    broke the launches that used to put them on axis 1. Batch * heads goes on axis 1."""
    longest = 2**31 // 2 - 2  # the domain's longest sequence at L = 2, and M, P are below 2 N
    for rows in (4_194_256, lk.gathered_length(4_194_256, 3, 4, 16384), 3 * longest):
        blocks, heads = lk._grid(rows, 64, 8)
        assert (blocks - 1) * 64 < rows <= blocks * 64  # every row in a block, no empty block
        assert blocks < 2**31 and heads <= lk.MAX_GRID_HEADS  # each axis within CUDA's limit
    assert lk._grid(4_194_256, 64, 1)[0] > lk.MAX_GRID_HEADS  # would not fit on axis 1
    # more than 65535 (batch, head) rows is refused before any launch (expand: no memory)
    q = torch.ones(1, 1, 512, 2, device=DEVICE).expand(1, 65536, 512, 2)
    k = torch.ones(1, 1, 512, 2, device=DEVICE)
    with pytest.raises(ValueError, match="more than the 65535 programs"):
        lk.lighthouse_triton(q, k, k, 2, 4, 128)


# -----------------------------------------------------------------------------
# GPU only: determinism, other devices, and the lengths that break the authors' code


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
    cos, sin = tables(N, D)

    def stages():
        scores = lk.triton_norm_scores(q, k, L, p)
        idx, inv = lk.triton_select(*scores, N, L, p, K)
        qq = q.detach().requires_grad_()
        q_sel = lk.triton_gather(qq, idx, inv, L, p, cos, sin)
        (dq,) = torch.autograd.grad(q_sel, qq, q_sel * 3)
        attn = q_sel.detach().requires_grad_()
        out = lk.triton_scatter(attn, idx, inv, N, L, p)
        (d_attn,) = torch.autograd.grad(out, attn, d_out)
        layer = lk.lighthouse_attention(q, k, v, L, p, K, impl="triton")
        return (*scores, idx, inv, q_sel, dq, out, d_attn, layer)

    first = stages()
    for _ in range(2):
        for a, b in zip(first, stages()):
            assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_runs_on_a_gpu_that_is_not_the_current_one():
    case = (1, 4, 2, 16384, 64, 3, 4, 256)
    q, k, v = (x.to("cuda:1") for x in random_qkv(case, dtype=torch.bfloat16))
    torch.cuda.set_device(0)
    out = lk.lighthouse_attention(q, k, v, 3, 4, 256, impl="triton")
    torch.cuda.set_device(1)
    assert out.device == q.device and torch.equal(out, lk.lighthouse_attention(q, k, v, 3, 4, 256, impl="triton"))
    torch.cuda.set_device(0)


@gpu_only
@pytest.mark.parametrize("N, K", [(524288, 2048), (32768, 1536)])
def test_long_lengths_that_break_the_authors_code(N, K):
    case = (1, 2, 1, N, 128, 3, 4, K)
    q, k, _ = random_qkv(case, dtype=torch.bfloat16)
    scores = lk.ref_norm_scores(q, k)
    idx = lk.lighthouse_select(*scores, 3, 4, K, impl="triton")
    assert torch.equal(idx, lk.lighthouse_select(*scores, 3, 4, K, impl="torch"))
    level, start, end = spans(idx[0, 0], N, 3, 4)
    assert (end[1:] >= end[:-1]).all() and (level == 0).sum() == 4 * K
    check_layer(case, torch.bfloat16, BF16_TOL)


@gpu_only
@pytest.mark.parametrize("N, L, p, K", [(2_097_154, 2, 2, 128), (262144, 3, 4, 128)])
def test_huge_tiles(N, L, p, K):
    """One tile of 1,048,577 coarsest entries (past Triton's largest block), and one of 16,384."""
    scores = torch.rand(2, 1, 1, N, device="cuda")
    assert torch.equal(lk.lighthouse_select(*scores, L, p, K, impl="triton"),
                       lk.lighthouse_select(*scores, L, p, K, impl="torch"))
