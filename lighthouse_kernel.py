"""
Lighthouse Attention (arXiv 2605.06554): a plain-PyTorch reference and Triton kernels.

Lighthouse is a training-only wrapper around ordinary causal attention. Instead of attending over
all N tokens, it builds a pyramid of mean-pooled q, k, v, picks a few thousand pyramid entries
(coarse summaries of most of the sequence, full resolution where the norms are largest), puts
them in a causal order, runs ordinary causal SDPA on that short sequence of M entries, and
scatters each entry's output back to the tokens that are allowed to see it.

    q, k, v (B, H, N, D)
      |  1. pyramid: mean-pool over spans of p^lvl tokens, lvl = 0..L-1
      |  2. scores: per entry, the max token norm of q and of k (fp32)
      |  3. selection (no gradient): per tile, coarse to fine, keep 64 by q + 64 by k
      |  4. order: sort the selected entries by an integer causal key
      |  5. attend: gather the M selected entries, causal SDPA on them
      v  6. scatter: entry covering [a, a+c) feeds tokens [a+c-1, a+2c-1)
    out (B, H, N, D)

Everything is indexed in one concatenated pyramid layout per head:
    [ level 0 (N entries) | level 1 (N/p entries) | ... | level L-1 (N/p^(L-1) entries) ]
so "pyramid index" e at level lvl means entry j = e - offset(lvl), covering tokens
[j * p^lvl, (j+1) * p^lvl).

The file has three parts:
  * check_lighthouse_config: the domain rules, with errors that say what to change.
  * The reference: one small function per step (`ref_*`), composed by `lighthouse_reference`.
    Read these to learn the method.
  * The Triton path: kernels for the pyramid+scores, the selection+order, the gather and the
    scatter, each with a hand-written backward; the attention core stays torch SDPA (cuDNN on
    an H100). It computes the same function as the reference, deterministically (no atomics).

Public entry points: lighthouse_attention(q, k, v, levels, pool, topk, impl=None) and
lighthouse_select(q_scores, k_scores, levels, pool, topk, impl=None).
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

TILE_KEEP = 128  # entries each tile keeps (refines) at every level
HALF_KEEP = 64  # ... of which 64 by q-score, then 64 by k-score


# -----------------------------------------------------------------------------
# The domain


SCORERS = ("norm", "dilated")


def check_lighthouse_config(seq_len, levels, pool, topk, n_head=None, n_kv_head=None, scorer="norm", dilation=4):
    """Raise ValueError (saying what to change) unless the layer is defined for these settings.

    Rules: levels >= 2; pool a power of two >= 2; topk a positive multiple of 128; seq_len a
    multiple of pool^(levels-1) with at least 128 coarsest entries per tile, i.e.
    seq_len / pool^(levels-1) >= topk (topk / 128 tiles of >= 128 entries); n_head a multiple of
    n_kv_head. The returned value is the number M of selected entries (the gathered length).
    """
    if not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (got {levels!r}); nearest valid: 2")
    if not isinstance(pool, int) or pool < 2 or pool & (pool - 1):
        nearest = 2 if not isinstance(pool, int) or pool < 2 else 1 << round(math.log2(pool))
        raise ValueError(f"pool must be a power of two >= 2 (got {pool!r}); nearest valid: {nearest}")
    if not isinstance(topk, int) or topk < TILE_KEEP or topk % TILE_KEEP:
        nearest = max(TILE_KEEP, TILE_KEEP * round(topk / TILE_KEEP)) if isinstance(topk, int) else TILE_KEEP
        raise ValueError(f"topk must be a positive multiple of {TILE_KEEP} (got {topk!r}); "
                         f"nearest valid: {nearest}")
    span = pool ** (levels - 1)  # tokens per coarsest entry
    smallest = topk * span  # topk/128 tiles of 128 coarsest entries
    if not isinstance(seq_len, int) or seq_len < smallest or seq_len % span:
        if isinstance(seq_len, int) and seq_len >= smallest:
            lower = seq_len // span * span
            hint = f"nearest valid: {lower} or {lower + span}"
        else:
            hint = f"the smallest valid sequence length is {smallest}"
        raise ValueError(
            f"sequence length {seq_len!r} is not valid for levels={levels}, pool={pool}, topk={topk}: "
            f"it must be a multiple of pool^(levels-1) = {span} and at least topk * {span} = "
            f"{smallest} (>= 128 coarsest entries per tile); {hint}. "
            f"Or lower topk / levels / pool.")
    if seq_len * levels >= 2**31:
        raise ValueError(f"sequence length {seq_len} is too long for levels={levels}: the causal "
                         f"sort key needs seq_len * levels < 2^31; the largest valid length is "
                         f"{(2**31 - 1) // levels // span * span}")
    if n_head is not None and n_kv_head is not None:
        if n_kv_head < 1 or n_head % n_kv_head:
            divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
            nearest = min(divisors, key=lambda d: abs(d - n_kv_head))
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head}); "
                             f"nearest valid n_kv_head: {nearest}")
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(map(repr, SCORERS))} (got {scorer!r})")
    if scorer == "dilated":
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be an integer >= 1 (got {dilation!r}); the authors use 4")
        if seq_len % dilation:
            raise ValueError(f"sequence length {seq_len} must be a multiple of the dilated scorer's dilation "
                             f"{dilation}: nearest valid lengths {seq_len // dilation * dilation} or "
                             f"{(seq_len // dilation + 1) * dilation}, or another dilation")
    return gathered_length(seq_len, levels, pool, topk)


def gathered_length(seq_len, levels, pool, topk):
    """M: all coarsest entries, plus 128*p candidates per tile at each of the L-1 finer levels."""
    return seq_len // pool ** (levels - 1) + (levels - 1) * pool * topk


def level_offsets(seq_len, levels, pool):
    """Start of each level in the concatenated pyramid layout, and the total length."""
    offsets, total = [], 0
    for lvl in range(levels):
        offsets.append(total)
        total += seq_len // pool**lvl
    return offsets, total


def _check_qkv(q, k, v, levels, pool, topk):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, H, N, D) and k, v (B, H_kv, N, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k and v must match q in batch, length and head dim: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    check_lighthouse_config(N, levels, pool, topk, n_head=H, n_kv_head=k.shape[1])


# -----------------------------------------------------------------------------
# The reference: plain PyTorch, one function per step


def ref_pyramid(x, levels, pool):
    """Step 1. Mean-pool x (B, H, N, D) over aligned spans of pool^lvl tokens, for every level.

    Returns the concatenated pyramid (B, H, N + N/p + ... , D). Level lvl+1 is the mean of p
    consecutive level-lvl entries, which is the mean of its p^(lvl+1) tokens.
    """
    B, H, N, D = x.shape
    pyramid = [x]
    for _ in range(1, levels):
        finer = pyramid[-1]
        # (B, H, n, D) -> (B, H, n/p, p, D) -> mean over the p children -> (B, H, n/p, D)
        pyramid.append(finer.view(B, H, finer.shape[2] // pool, pool, D).mean(dim=3))
    return torch.cat(pyramid, dim=2)


def ref_token_scores(q, k):
    """Step 2a. Per-token scores for each kv head: max over the group's query heads of ||q_t||,
    and ||k_t||; both (B, H_kv, N) in fp32.

    The squared norm is summed in fp64 so that the result does not depend on summation order:
    for bf16 inputs every term is exact, so both paths produce bitwise-equal scores and
    select the same entries. (bf16 norms tie constantly; fp32 is what the scores are kept in.)
    """
    B, H, N, D = q.shape
    G = k.shape[1]
    q_norm = q.double().square().sum(-1).sqrt().float()  # (B, H, N)
    k_norm = k.double().square().sum(-1).sqrt().float()  # (B, G, N)
    q_score = q_norm.view(B, G, H // G, N).amax(dim=2)  # (B, G, N): max over the group's heads
    return q_score, k_norm


def ref_score_pyramid(token_scores, levels, pool):
    """Step 2b. Scores of coarser entries: the max over their tokens, as a max-pool of the level
    below. (B, G, N) -> concatenated (B, G, N + N/p + ...)."""
    B, G, N = token_scores.shape
    pyramid = [token_scores]
    for _ in range(1, levels):
        finer = pyramid[-1]
        pyramid.append(finer.view(B, G, finer.shape[2] // pool, pool).amax(dim=3))  # (B, G, n/p)
    return torch.cat(pyramid, dim=2)


def ref_keep(q_score, k_score):
    """The choice made at every level of a tile: among the candidates (last dim), keep the 64 with
    the largest q-score, then the 64 with the largest k-score among the rest. Stable sorts make
    the lower index win ties. Returns a bool mask of the 128 kept candidates."""
    by_q = torch.sort(q_score, dim=-1, descending=True, stable=True).indices[..., :HALF_KEEP]
    kept = torch.zeros_like(q_score, dtype=torch.bool).scatter_(-1, by_q, True)
    k_rest = k_score.masked_fill(kept, float("-inf"))
    by_k = torch.sort(k_rest, dim=-1, descending=True, stable=True).indices[..., :HALF_KEEP]
    return kept.scatter_(-1, by_k, True)


def causal_key(level, j, is_node, levels, pool):
    """Step 4's integer sort key of entry j of `level` (tensors or ints).

    A leaf sits at the start s of its span: key s*L. A node sits just after the last token of its
    span (end b, exclusive): key b*L - L + level, i.e. after all its descendants (lower levels end
    there too and get smaller keys), and before anything starting at b (key b*L).
    """
    span = pool**level
    leaf_key = j * span * levels
    node_key = (j + 1) * span * levels - levels + level
    return torch.where(is_node, node_key, leaf_key)


@torch.no_grad()
def ref_select(q_score_pyr, k_score_pyr, seq_len, levels, pool, topk):
    """Steps 3 and 4. Choose the pyramid entries to attend over, per (batch, kv head), and sort
    them into causal order.

    The coarsest level is cut into T = topk/128 tiles (the last one takes the remainder). In a
    tile the candidates start as all its coarsest entries; at each level every candidate is
    emitted: the 128 kept ones as nodes (which are also refined: their p children become the
    next level's candidates), the rest as leaves. At level 0 all candidates are emitted as
    leaves. Returns pyramid indices (B, G, M) int64 in causal order.
    """
    B, G, _ = q_score_pyr.shape
    offsets, _ = level_offsets(seq_len, levels, pool)
    top = levels - 1
    n_top = seq_len // pool**top
    n_tiles = topk // TILE_KEEP
    tile = n_top // n_tiles
    device = q_score_pyr.device
    children = torch.arange(pool, device=device)

    indices, keys = [], []
    for t in range(n_tiles):
        end = n_top if t == n_tiles - 1 else (t + 1) * tile
        cand = torch.arange(t * tile, end, device=device).expand(B, G, -1)  # (B, G, C) level-top j's
        for level in range(top, -1, -1):
            pyr_index = offsets[level] + cand  # (B, G, n_cand)
            if level == 0:
                is_node = torch.zeros_like(cand, dtype=torch.bool)
            else:
                is_node = ref_keep(q_score_pyr.gather(2, pyr_index), k_score_pyr.gather(2, pyr_index))
            indices.append(pyr_index)
            keys.append(causal_key(level, cand, is_node, levels, pool))
            if level > 0:
                # the kept (ascending) become parents: (B, G, 128) -> children (B, G, 128 * p)
                parents = cand[is_node].view(B, G, TILE_KEEP)
                cand = (parents[..., None] * pool + children).flatten(2)
    indices, keys = torch.cat(indices, dim=2), torch.cat(keys, dim=2)  # (B, G, M)
    order = keys.argsort(dim=2)  # keys are unique, so this order is fully determined
    return indices.gather(2, order)


def inverse_map(indices, pyramid_len):
    """(B, G, M) selected pyramid indices -> (B, G, pyramid_len) position in the gathered sequence,
    or -1 where the entry is not selected. Lets the scatter and backward passes be gathers."""
    B, G, M = indices.shape
    positions = torch.arange(M, device=indices.device).expand(B, G, M)
    inv = torch.full((B, G, pyramid_len), -1, dtype=torch.int64, device=indices.device)
    return inv.scatter_(2, indices, positions)


def ref_gather(pyramid, indices):
    """Step 5a. pyramid (B, Hx, P, D), indices (B, G, M) -> (B, Hx, M, D): each head takes the
    entries its kv group selected (a query head h belongs to group h // (Hx / G))."""
    B, Hx, _, D = pyramid.shape
    per_group = indices.repeat_interleave(Hx // indices.shape[1], dim=1)  # (B, Hx, M)
    return pyramid.gather(2, per_group[..., None].expand(-1, -1, -1, D))


def ref_scatter(attn, inv, seq_len, levels, pool):
    """Step 6. attn (B, H, M, D) -> out (B, H, N, D) with the causal shift.

    out[t] = sum over levels of the output of entry (lvl, (t+1) // p^lvl - 1), if selected: the
    most recently *completed* span of each level. Equivalently an entry covering [a, a+c) feeds
    tokens [a+c-1, a+2c-1): from its own last token on, never earlier.
    """
    B, H, M, D = attn.shape
    G = inv.shape[1]
    offsets, _ = level_offsets(seq_len, levels, pool)
    t = torch.arange(seq_len, device=attn.device)
    out = torch.zeros(B, H, seq_len, D, dtype=attn.dtype, device=attn.device)
    for level in range(levels):
        j = (t + 1) // pool**level - 1  # (N,) last completed entry of this level; -1: none yet
        pos = inv[:, :, offsets[level] + j.clamp(min=0)]  # (B, G, N)
        pos = torch.where(j >= 0, pos, -1).repeat_interleave(H // G, dim=1)  # (B, H, N)
        rows = attn.gather(2, pos.clamp(min=0)[..., None].expand(-1, -1, -1, D))  # (B, H, N, D)
        out = out + rows * (pos >= 0)[..., None]
    return out


def lighthouse_reference(q, k, v, levels, pool, topk):
    """The whole layer in plain PyTorch: q (B, H, N, D), k, v (B, H_kv, N, D) -> (B, H, N, D)."""
    _check_qkv(q, k, v, levels, pool, topk)
    B, H, N, D = q.shape
    G = k.shape[1]
    q_pyr, k_pyr, v_pyr = (ref_pyramid(x, levels, pool) for x in (q, k, v))  # (B, *, P, D)
    with torch.no_grad():
        q_tok, k_tok = ref_token_scores(q, k)  # (B, G, N) each
        q_score = ref_score_pyramid(q_tok, levels, pool)  # (B, G, P)
        k_score = ref_score_pyramid(k_tok, levels, pool)
        indices = ref_select(q_score, k_score, N, levels, pool, topk)  # (B, G, M)
        inv = inverse_map(indices, q_score.shape[2])  # (B, G, P)
    q_sel = ref_gather(q_pyr, indices)  # (B, H, M, D)
    k_sel = ref_gather(k_pyr, indices).repeat_interleave(H // G, dim=1)  # (B, G, M, D) -> (B, H, M, D)
    v_sel = ref_gather(v_pyr, indices).repeat_interleave(H // G, dim=1)
    attn = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True)  # (B, H, M, D)
    return ref_scatter(attn, inv, N, levels, pool)


# -----------------------------------------------------------------------------
# The Triton path
#
# Kernels work on one (batch, head) row per program id 0 and a block of tokens or entries per
# program id 1. The pyramid above level 0 is stored separately ("upper", (B, Hx, P - N, D)):
# level 0 is the input itself, which the gather reads directly instead of copying.
# Offsets are int64 everywhere: at N = 512K the flat index into (B, H, N, D) passes 2^31.


@triton.jit
def _level_start(N, level: tl.constexpr, POOL: tl.constexpr):
    """Offset of `level` in the concatenated pyramid layout: N + N/p + ... (level terms)."""
    start = N * 0
    for lvl in tl.static_range(level):
        start += N // (POOL**lvl)
    return start


@triton.jit
def _score_kernel(x_ptr, sx_b, sx_h, sx_n, score_ptr, N, P, D, G: tl.constexpr, GROUP: tl.constexpr,
                  LEVELS: tl.constexpr, POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Score pyramid of kv group g: token score = max over the group's GROUP heads of ||x_t||,
    coarser scores = max over the span. Program (b*G + g, block of tokens)."""
    bg = tl.program_id(0).to(tl.int64)
    b, g = bg // G, bg % G
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < N, d < D
    best = tl.zeros([BLOCK_T], dtype=tl.float64)  # largest squared norm over the group
    for i in range(GROUP):
        x = tl.load(x_ptr + b * sx_b + (g * GROUP + i) * sx_h + t[:, None] * sx_n + d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float64)  # (BLOCK_T, BLOCK_D)
        best = tl.maximum(best, tl.sum(x * x, axis=1))  # squares of bf16/fp32 values are exact in fp64
    score = tl.sqrt(best).to(tl.float32)  # (BLOCK_T,); the fp64 square root is correctly rounded
    tl.store(score_ptr + bg * P + t, score, mask=t_ok)
    for lvl in tl.static_range(1, LEVELS):
        # (BLOCK_T,) -> (BLOCK_T / p^lvl, p^lvl) -> max over each span
        pooled = tl.max(tl.reshape(score, [BLOCK_T // POOL**lvl, POOL**lvl]), axis=1)
        j = tl.program_id(1) * (BLOCK_T // POOL**lvl) + tl.arange(0, BLOCK_T // POOL**lvl).to(tl.int64)
        tl.store(score_ptr + bg * P + _level_start(N, lvl, POOL) + j, pooled, mask=j < N // POOL**lvl)


@triton.jit
def _pool_kernel(x_ptr, sx_b, sx_h, sx_n, upper_ptr, N, P_UP, D, HX: tl.constexpr, LEVELS: tl.constexpr,
                 POOL: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean-pooled levels 1..L-1 of one head, for BLOCK_J coarsest entries (and everything below
    them). Each level is the mean of its p children, read from the level below (level 0 is x):
    plain row loads, no reshapes, and every finer level is still in cache when it is read."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // HX, bh % HX
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    for lvl in tl.static_range(1, LEVELS):
        # this program's entries of level lvl: BLOCK_J * p^(L-1-lvl) of them
        e = tl.program_id(1) * (BLOCK_J * POOL ** (LEVELS - 1 - lvl)) + \
            tl.arange(0, BLOCK_J * POOL ** (LEVELS - 1 - lvl)).to(tl.int64)
        ok = (e < N // POOL**lvl)[:, None] & d_ok[None, :]
        acc = tl.zeros([BLOCK_J * POOL ** (LEVELS - 1 - lvl), BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(POOL):
            child = e * POOL + c  # (entries,) index of the c-th child in level lvl-1
            if lvl == 1:
                rows = tl.load(x_ptr + b * sx_b + h * sx_h + child[:, None] * sx_n + d[None, :], mask=ok)
            else:  # written just above by this program: bypass L1, read from L2
                rows = tl.load(upper_ptr + (bh * P_UP + _level_start(N, lvl - 1, POOL) - N + child)[:, None] * D
                               + d[None, :], mask=ok, cache_modifier=".cg")
            acc += rows.to(tl.float32)
        tl.store(upper_ptr + (bh * P_UP + _level_start(N, lvl, POOL) - N + e)[:, None] * D + d[None, :],
                 (acc / POOL).to(upper_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()  # the next level reads rows that other threads of this program wrote


@triton.jit
def _kth_largest_key(key, K: tl.constexpr, NBITS: tl.constexpr):
    """The K-th largest of non-negative, distinct int64 keys (-1 = absent), found bit by bit from
    the top: the largest threshold with at least K keys at or above it. Needs only counts, no sort."""
    threshold = tl.min(key, axis=0) * 0  # int64 scalar 0
    for i in range(NBITS):
        trial = threshold | (threshold * 0 + 1) << (NBITS - 1 - i)
        enough = tl.sum((key >= trial).to(tl.int32), axis=0) >= K
        threshold = tl.where(enough, trial, threshold)
    return threshold


@triton.jit
def _keep(q_score, k_score, valid, rank, RANK_BITS: tl.constexpr):
    """Triton twin of ref_keep: bool mask of the 64 best by q-score, then 64 best by k-score.

    Key = (fp32 score bits << RANK_BITS) | (2^RANK_BITS - 1 - rank). Scores are >= 0, so their bit
    patterns order like the values, and among equal scores the lower rank (index) wins.
    """
    NBITS: tl.constexpr = 31 + RANK_BITS
    tie = (1 << RANK_BITS) - 1 - rank
    q_key = tl.where(valid, (q_score.to(tl.int32, bitcast=True).to(tl.int64) << RANK_BITS) | tie, -1)
    by_q = q_key >= _kth_largest_key(q_key, 64, NBITS)  # keys are distinct: exactly 64
    k_key = tl.where(valid & ~by_q, (k_score.to(tl.int32, bitcast=True).to(tl.int64) << RANK_BITS) | tie, -1)
    by_k = k_key >= _kth_largest_key(k_key, 64, NBITS)
    return by_q | by_k


@triton.jit
def _emit(work_ptr, list_start, next_start, r, ok, j, kept, lvl: tl.constexpr,
          LEVELS: tl.constexpr, POOL: tl.constexpr, N):
    """Write this level's candidates as (causal key << 32 | pyramid index) at work[list_start + r],
    and the pyramid indices of the kept ones' children, in order, at work[next_start + ...]."""
    key = tl.where(kept, (j + 1) * POOL**lvl * LEVELS - LEVELS + lvl, j * POOL**lvl * LEVELS)
    tl.store(work_ptr + list_start + r, (key << 32) | (_level_start(N, lvl, POOL) + j), mask=ok)
    if lvl > 0:
        # the k-th kept entry's children go to slots k*p .. k*p + p-1 of the next list
        slot = tl.cumsum(kept.to(tl.int64), axis=0) - 1  # (n,)
        c = tl.arange(0, POOL)[None, :]
        child = _level_start(N, lvl - 1, POOL) + j[:, None] * POOL + c  # (n, p)
        tl.store(work_ptr + next_start + slot[:, None] * POOL + c, child, mask=(ok & kept)[:, None])


@triton.jit
def _count_below(work_ptr, start, length, code, STEPS: tl.constexpr):
    """For each code, how many entries of the sorted list work[start : start+length] are smaller
    (a vectorised binary search)."""
    lo = code * 0
    hi = lo + length
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        go = lo < hi
        probe = tl.load(work_ptr + start + mid, mask=go, other=0, cache_modifier=".cg")
        right = go & (probe < code)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(go & ~right, mid, hi)
    return lo


@triton.jit
def _select_kernel(q_score_ptr, k_score_ptr, idx_ptr, inv_ptr, work_ptr, N, P, M, N_TOP, TILE, N_TILES,
                   LEVELS: tl.constexpr, POOL: tl.constexpr, BLOCK_C: tl.constexpr, C_BITS: tl.constexpr,
                   FINE_BITS: tl.constexpr):
    """Selection and causal order for one (batch*kv head, tile).

    Tiles own disjoint token ranges, so the global causal order is the tiles' orders one after
    another, and each tile's slice of the output has a size known in advance. Within a tile, the
    candidates of each level, emitted in ascending index order, are already in causal-key order
    (see causal_key), so the tile's order is a merge of L sorted lists: an entry's position is
    its rank in its own list plus, for every other list, the number of smaller keys there.
    The lists live in `work` (same layout as idx), which also carries the children between levels.
    """
    bg = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    TOP: tl.constexpr = LEVELS - 1
    FINE: tl.constexpr = 128 * POOL  # candidates at each finer level
    n_top = tl.where(tile == N_TILES - 1, N_TOP - tile * TILE, TILE)  # last tile takes the rest
    slice_start = bg * M + tile * (TILE + TOP * FINE)  # this tile's slice of idx and work
    scores = bg * P

    # Coarsest level: every entry of the tile is a candidate. List 0 of the slice.
    r = tl.arange(0, BLOCK_C).to(tl.int64)
    ok = r < n_top
    j = tile * TILE + r
    e = _level_start(N, TOP, POOL) + j
    kept = _keep(tl.load(q_score_ptr + scores + e, mask=ok, other=0.0),
                 tl.load(k_score_ptr + scores + e, mask=ok, other=0.0), ok, r, C_BITS)
    _emit(work_ptr, slice_start, slice_start + n_top, r, ok, j, kept, TOP, LEVELS, POOL, N)

    # Finer levels: the p children of each kept entry. List 1 + step, right after the previous.
    r = tl.arange(0, FINE).to(tl.int64)
    for lvl in tl.static_range(TOP - 1, -1, -1):
        list_start = slice_start + n_top + (TOP - 1 - lvl) * FINE
        tl.debug_barrier()  # the children were stored by other threads
        e = tl.load(work_ptr + list_start + r, cache_modifier=".cg")
        j = e - _level_start(N, lvl, POOL)
        if lvl > 0:
            kept = _keep(tl.load(q_score_ptr + scores + e), tl.load(k_score_ptr + scores + e), r >= 0, r, FINE_BITS)
        else:
            kept = r < 0  # level 0: all leaves
        tl.debug_barrier()  # all threads have read their candidates before the list is overwritten
        _emit(work_ptr, list_start, list_start + FINE, r, r >= 0, j, kept, lvl, LEVELS, POOL, N)

    # Merge the L sorted lists into causal order.
    tl.debug_barrier()
    STEPS: tl.constexpr = max(C_BITS, FINE_BITS) + 1  # halvings that empty the longest list
    for a in tl.static_range(LEVELS):
        if a == 0:
            r = tl.arange(0, BLOCK_C).to(tl.int64)
            ok, a_start = r < n_top, slice_start
        else:
            r = tl.arange(0, FINE).to(tl.int64)
            ok, a_start = r >= 0, slice_start + n_top + (a - 1) * FINE
        code = tl.load(work_ptr + a_start + r, mask=ok, other=0, cache_modifier=".cg")
        pos = r
        for b in tl.static_range(LEVELS):
            if b != a:
                if b == 0:
                    pos += _count_below(work_ptr, slice_start, n_top, code, STEPS)
                else:
                    pos += _count_below(work_ptr, slice_start + n_top + (b - 1) * FINE, FINE, code, STEPS)
        e = code & 0xFFFFFFFF
        tl.store(idx_ptr + slice_start + pos, e, mask=ok)
        tl.store(inv_ptr + scores + e, slice_start - bg * M + pos, mask=ok)


@triton.jit
def _gather_kernel(x_ptr, sx_b, sx_h, sx_n, upper_ptr, idx_ptr, out_ptr, N, P_UP, M, D,
                   H: tl.constexpr, HX: tl.constexpr, G: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, h, m] = pyramid row idx[b, group(h), m] of source head h // (H / HX): level-0 rows
    come straight from x, coarser rows from `upper`."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    src, g = h // (H // HX), h // (H // G)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < M, d < D
    e = tl.load(idx_ptr + (b * G + g) * M + m, mask=m_ok, other=0)  # (BLOCK_M,) pyramid indices
    fine = e < N
    rows = tl.load(x_ptr + b * sx_b + src * sx_h + e[:, None] * sx_n + d[None, :],
                   mask=(m_ok & fine)[:, None] & d_ok[None, :], other=0.0)
    coarse = tl.load(upper_ptr + ((b * HX + src) * P_UP + e - N)[:, None] * D + d[None, :],
                     mask=(m_ok & ~fine)[:, None] & d_ok[None, :], other=0.0)
    tl.store(out_ptr + (bh * M + m)[:, None] * D + d[None, :], tl.where(fine[:, None], rows, coarse),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_backward_kernel(grad_ptr, inv_ptr, dx_ptr, N, P, M, D,
                            H: tl.constexpr, HX: tl.constexpr, G: tl.constexpr, LEVELS: tl.constexpr,
                            POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adjoint of pyramid + gather, fused: dx[t] = sum over levels of grad(entry containing t) / span,
    summed over the query heads that read this source head. Each token is written once."""
    bs = tl.program_id(0).to(tl.int64)
    b, src = bs // HX, bs % HX
    REP: tl.constexpr = H // HX  # output heads that gathered from this source head
    g = (src * REP) // (H // G)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < N, d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for lvl in tl.static_range(LEVELS):
        # position in the gathered sequence of the level-lvl entry that contains t (-1: none)
        pos = tl.load(inv_ptr + (b * G + g) * P + _level_start(N, lvl, POOL) + t // POOL**lvl,
                      mask=t_ok, other=-1)
        ok = (pos >= 0)[:, None] & d_ok[None, :]
        for i in range(REP):
            h = src * REP + i
            acc += tl.load(grad_ptr + ((b * H + h) * M + pos)[:, None] * D + d[None, :], mask=ok,
                           other=0.0).to(tl.float32) / POOL**lvl
    tl.store(dx_ptr + (bs * N + t)[:, None] * D + d[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_kernel(attn_ptr, inv_ptr, out_ptr, N, P, M, D, H: tl.constexpr, G: tl.constexpr,
                    LEVELS: tl.constexpr, POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum over levels of attn[entry (lvl, (t+1) // p^lvl - 1)] where selected: a gather
    through the inverse map, so every output row is written once (no atomics)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < N, d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for lvl in tl.static_range(LEVELS):
        j = (t + 1) // POOL**lvl - 1  # most recently completed entry of this level
        pos = tl.load(inv_ptr + (b * G + g) * P + _level_start(N, lvl, POOL) + j,
                      mask=t_ok & (j >= 0), other=-1)
        acc += tl.load(attn_ptr + (bh * M + pos)[:, None] * D + d[None, :],
                       mask=(pos >= 0)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + (bh * N + t)[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_backward_kernel(grad_ptr, idx_ptr, dattn_ptr, N, M, D, H: tl.constexpr, G: tl.constexpr,
                             LEVELS: tl.constexpr, POOL: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adjoint of the scatter: d attn[m] = sum of grad over the window [a+c-1, a+2c-1) ∩ [0, N)
    that entry idx[m] (covering [a, a+c)) fed."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < M, d < D
    e = tl.load(idx_ptr + (b * G + g) * M + m, mask=m_ok, other=0)
    # decode the entry's level: span c = p^level and index j within the level
    span = e * 0 + 1
    j = e
    for lvl in tl.static_range(1, LEVELS):
        start = _level_start(N, lvl, POOL)
        span = tl.where(e >= start, POOL**lvl, span)
        j = tl.where(e >= start, e - start, j)
    first = (j + 1) * span - 1  # the entry's own last token
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(POOL ** (LEVELS - 1)):  # the widest window; narrower entries mask the rest
        t = first + i
        ok = m_ok & (i < span) & (t < N)
        acc += tl.load(grad_ptr + (bh * N + t)[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(dattn_ptr + (bh * M + m)[:, None] * D + d[None, :], acc.to(dattn_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# Rows (tokens or entries) per program. Triton's CPU interpreter runs every program as Python,
# so there fewer, larger programs keep the tests fast; on a GPU, 64 rows of 128 dims fill a program.
ROWS = 256 if os.environ.get("TRITON_INTERPRET") == "1" else 64


def _token_block(levels, pool):
    # a power of two holding whole coarsest spans, so that every pooled entry is in one program
    return max(ROWS, pool ** (levels - 1))


def _strides(x):
    if x.stride(3) != 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1), x.stride(2)


def triton_pyramid(x, n_groups, levels, pool, with_scores):
    """x (B, Hx, N, D) -> upper pyramid (B, Hx, P - N, D) in x's dtype and, if with_scores, the
    score pyramid (B, G, P) in fp32 (max over the kv group's heads)."""
    x, sb, sh, sn = _strides(x)
    B, HX, N, D = x.shape
    _, P = level_offsets(N, levels, pool)
    block_d = triton.next_power_of_2(D)
    upper = torch.empty(B, HX, P - N, D, dtype=x.dtype, device=x.device)
    coarsest = max(1, 4 * ROWS // pool ** (levels - 1))  # coarsest entries per program: ~256 tokens
    _pool_kernel[(B * HX, triton.cdiv(N // pool ** (levels - 1), coarsest))](
        x, sb, sh, sn, upper, N, P - N, D, HX=HX, LEVELS=levels, POOL=pool, BLOCK_J=coarsest, BLOCK_D=block_d,
        num_warps=4)
    if not with_scores:
        return upper, None
    scores = torch.empty(B, n_groups, P, dtype=torch.float32, device=x.device)
    block = _token_block(levels, pool)
    _score_kernel[(B * n_groups, triton.cdiv(N, block))](
        x, sb, sh, sn, scores, N, P, D, G=n_groups, GROUP=HX // n_groups, LEVELS=levels, POOL=pool,
        BLOCK_T=block, BLOCK_D=block_d, num_warps=4)
    return upper, scores


@torch.no_grad()
def triton_select(q_score_pyr, k_score_pyr, seq_len, levels, pool, topk):
    """Twin of ref_select on score pyramids (B, G, P). Returns the selected pyramid indices in
    causal order (B, G, M) int64 and the inverse map (B, G, P) int64."""
    B, G, P = q_score_pyr.shape
    M = gathered_length(seq_len, levels, pool, topk)
    n_top = seq_len // pool ** (levels - 1)
    n_tiles = topk // TILE_KEEP
    tile = n_top // n_tiles
    idx = torch.empty(B, G, M, dtype=torch.int64, device=q_score_pyr.device)
    work = torch.empty_like(idx)  # per-level candidate lists, see _select_kernel
    inv = torch.full((B, G, P), -1, dtype=torch.int64, device=q_score_pyr.device)
    widest = triton.next_power_of_2(tile + n_top % n_tiles)  # the last tile's coarsest candidates
    _select_kernel[(B * G, n_tiles)](
        q_score_pyr.contiguous(), k_score_pyr.contiguous(), idx, inv, work, seq_len, P, M, n_top, tile,
        n_tiles, LEVELS=levels, POOL=pool, BLOCK_C=widest, C_BITS=widest.bit_length() - 1,
        FINE_BITS=(TILE_KEEP * pool).bit_length() - 1, num_warps=8)
    return idx, inv


class _PyramidGather(torch.autograd.Function):
    """Gather the selected pyramid rows of x for every output head: (B, Hx, N, D) -> (B, H, M, D).
    `upper` must be triton_pyramid(x)'s pooled levels; the backward differentiates through the
    pooling too, so x gets the whole gradient."""

    @staticmethod
    def forward(ctx, x, upper, idx, inv, n_heads, levels, pool):
        x, sb, sh, sn = _strides(x)
        B, HX, N, D = x.shape
        G, M = idx.shape[1], idx.shape[2]
        out = torch.empty(B, n_heads, M, D, dtype=x.dtype, device=x.device)
        block = ROWS
        _gather_kernel[(B * n_heads, triton.cdiv(M, block))](
            x, sb, sh, sn, upper, idx, out, N, upper.shape[2], M, D, H=n_heads, HX=HX, G=G,
            BLOCK_M=block, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
        ctx.save_for_backward(inv)
        ctx.shape, ctx.dtype, ctx.levels, ctx.pool = x.shape, x.dtype, levels, pool
        return out

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        B, HX, N, D = ctx.shape
        H, M = grad.shape[1], grad.shape[2]
        dx = torch.empty(B, HX, N, D, dtype=ctx.dtype, device=grad.device)
        block = ROWS
        _gather_backward_kernel[(B * HX, triton.cdiv(N, block))](
            grad.contiguous(), inv, dx, N, inv.shape[2], M, D, H=H, HX=HX, G=inv.shape[1],
            LEVELS=ctx.levels, POOL=ctx.pool, BLOCK_T=block, BLOCK_D=triton.next_power_of_2(D),
            num_warps=4)
        return dx, None, None, None, None, None, None


class _CausalScatter(torch.autograd.Function):
    """attn (B, H, M, D) -> out (B, H, N, D) with the causal shift (see ref_scatter)."""

    @staticmethod
    def forward(ctx, attn, idx, inv, seq_len, levels, pool):
        attn = attn.contiguous()
        B, H, M, D = attn.shape
        out = torch.empty(B, H, seq_len, D, dtype=attn.dtype, device=attn.device)
        block = ROWS
        _scatter_kernel[(B * H, triton.cdiv(seq_len, block))](
            attn, inv, out, seq_len, inv.shape[2], M, D, H=H, G=inv.shape[1], LEVELS=levels, POOL=pool,
            BLOCK_T=block, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
        ctx.save_for_backward(idx)
        ctx.levels, ctx.pool, ctx.dtype = levels, pool, attn.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        B, H, N, D = grad.shape
        M = idx.shape[2]
        dattn = torch.empty(B, H, M, D, dtype=ctx.dtype, device=grad.device)
        block = ROWS
        _scatter_backward_kernel[(B * H, triton.cdiv(M, block))](
            grad.contiguous(), idx, dattn, N, M, D, H=H, G=idx.shape[1], LEVELS=ctx.levels, POOL=ctx.pool,
            BLOCK_M=block, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
        return dattn, None, None, None, None, None


def lighthouse_triton(q, k, v, levels, pool, topk):
    """The whole layer with Triton kernels around torch SDPA. Same contract as lighthouse_reference."""
    _check_qkv(q, k, v, levels, pool, topk)
    B, H, N, D = q.shape
    G = k.shape[1]
    q_up, q_score = triton_pyramid(q, G, levels, pool, with_scores=True)  # (B, H, P-N, D), (B, G, P)
    k_up, k_score = triton_pyramid(k, G, levels, pool, with_scores=True)
    v_up, _ = triton_pyramid(v, G, levels, pool, with_scores=False)
    idx, inv = triton_select(q_score, k_score, N, levels, pool, topk)  # (B, G, M), (B, G, P)
    # k and v are gathered straight into every query head's slot: SDPA sees plain (B, H, M, D)
    q_sel = _PyramidGather.apply(q, q_up, idx, inv, H, levels, pool)
    k_sel = _PyramidGather.apply(k, k_up, idx, inv, H, levels, pool)
    v_sel = _PyramidGather.apply(v, v_up, idx, inv, H, levels, pool)
    attn = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True)  # (B, H, M, D)
    return _CausalScatter.apply(attn, idx, inv, N, levels, pool)


# -----------------------------------------------------------------------------
# Public entry points


def _pick_impl(impl, tensor):
    if impl is None:
        return "triton" if tensor.is_cuda else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'torch', 'triton' or None (got {impl!r})")
    return impl


def lighthouse_attention(q, k, v, levels, pool, topk, impl=None, scorer="norm", dilation=4, rope=None):
    """Lighthouse attention. q (B, H, N, D), k, v (B, H_kv, N, D), after RoPE -> (B, H, N, D).

    impl: "torch" (the reference), "triton", or None for Triton on CUDA and the reference on CPU.
    """
    if scorer != "norm" or rope is not None:
        raise NotImplementedError("the dilated scorer and RoPE at the span end are not built yet")
    if _pick_impl(impl, q) == "triton":
        return lighthouse_triton(q, k, v, levels, pool, topk)
    return lighthouse_reference(q, k, v, levels, pool, topk)


def lighthouse_select(q_scores, k_scores, levels, pool, topk, impl=None):
    """The selection on its own: per-token fp32 scores (B, H_kv, N) -> the selected entries in
    causal order as int64 indices (B, H_kv, M) into the concatenated pyramid layout."""
    N = q_scores.shape[-1]
    check_lighthouse_config(N, levels, pool, topk)
    q_pyr = ref_score_pyramid(q_scores.float(), levels, pool)  # (B, G, P): max-pools, exact
    k_pyr = ref_score_pyramid(k_scores.float(), levels, pool)
    if _pick_impl(impl, q_scores) == "triton":
        return triton_select(q_pyr, k_pyr, N, levels, pool, topk)[0]
    return ref_select(q_pyr, k_pyr, N, levels, pool, topk)
