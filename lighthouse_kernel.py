"""
Lighthouse Attention (arXiv 2605.06554): a plain-PyTorch reference and Triton kernels.

Lighthouse is a training-only wrapper around ordinary causal attention. Instead of attending over
all N tokens, it builds a pyramid of mean-pooled q, k, v, picks a few thousand pyramid entries
(coarse summaries of most of the sequence, full resolution where the scores are largest), puts
them in a causal order, runs ordinary causal SDPA on that short sequence of M entries, and
scatters each entry's output back to the tokens that are allowed to see it.

    q (B, H, N, D), k, v (B, H_kv, N, D)
      |  1. pyramid: mean-pool over spans of p^lvl tokens, lvl = 0..L-1
      |  2. scores: per token, a q-score and a k-score (fp32); per entry, the max over its tokens
      |  3. selection (no gradient): per tile, coarse to fine, keep 64 by q + 64 by k
      |  4. order: sort the selected entries by an integer causal key
      |  5. attend: gather the M selected entries, causal SDPA on them
      v  6. scatter: entry covering [a, a+c) feeds tokens [a+c-1, a+2c-1)
    out (B, H, N, D)

Three variants (see lighthouse_attention's arguments):
  * scorer: "norm" (the token scores are ||q_t|| and ||k_t||) or "dilated" (the norms of two
    causal attention outputs computed inside each of `dilation` interleaved phases of positions:
    queries over keys, and keys over queries).
  * rope: None (q, k arrive rotated, so pooled entries mix rotations of different positions) or
    (cos, sin) tables (q, k arrive raw; each selected entry is rotated at its span's last token).
  * selection: "paper" (step 3 as above; it lets an output depend on later tokens of its tile,
    see ref_select) or "causal" (ours, ref_select_causal: each level keeps the entries whose
    scores pass thresholds taken from the tile before, so nothing depends on a later token).

Everything is indexed in one concatenated pyramid layout per head:
    [ level 0 (N entries) | level 1 (N/p entries) | ... | level L-1 (N/p^(L-1) entries) ]
so "pyramid index" e at level lvl means entry j = e - offset(lvl), covering tokens
[j * p^lvl, (j+1) * p^lvl).

The file reads top to bottom as the method:
  * The layout: pyramid indices, the selection's tiles, the gathered length M.
  * The reference: one small function per step (`ref_*`), in the order the layer runs them,
    composed by `lighthouse_reference`. Read these to learn the method.
  * The domain: what the layer accepts (check_lighthouse_config), with errors that say what to
    change, checked before any work.
  * The Triton path: the kernels, each the twin of a reference step (the norms, the dilated
    scorer, the selection + order, the gather with the pooling and the span-end rotation fused,
    the scatter, and the backward passes of the last two), then their host wrappers (`triton_*`)
    and their registration as torch ops, so that torch.compile sees each launch as one call
    instead of breaking its graph; composed by `lighthouse_triton`. The attention core stays
    torch SDPA (cuDNN on an H100/H200). It computes the same function as the reference,
    deterministically (no atomics), with one exception where the GPU allows: the dilated
    scorer has a kernel that runs both of its attention passes flash-style and writes only the
    fp32 norm of each output row; on GPUs with FP8 tensor cores its matrix products can take
    FP8 (e4m3) operands: coarser scores (e4m3 keeps 3 mantissa bits), which can change part of
    the selection. DILATED_KERNEL picks it (FP8 or the inputs' dtype) or sdpa_dilated_scores,
    its readable twin on two SDPA passes and the default (on an H200 the kernel saves memory,
    not time).

Public entry points: lighthouse_attention(q, k, v, levels, pool, topk, impl=None, scorer="norm",
dilation=4, rope=None) and lighthouse_select(q_scores, k_scores, levels, pool, topk, impl=None).
"""

import contextlib
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

TILE_KEEP = 128  # entries each tile keeps (refines) at every level
HALF_KEEP = 64  # ... of which 64 by q-score, then 64 by k-score
SCORERS = ("norm", "dilated")
SELECTIONS = ("paper", "causal")  # ref_select, ref_select_causal
MAX_GRID_HEADS = 65535  # CUDA's limit on grid axis 1, where the kernels put batch * heads


# -----------------------------------------------------------------------------
# The layout: pyramid indices, tiles, the gathered length


def level_offsets(seq_len, levels, pool):
    """Start of each level in the concatenated pyramid layout, and the total length P."""
    offsets, total = [], 0
    for lvl in range(levels):
        offsets.append(total)
        total += seq_len // pool**lvl
    return offsets, total


def gathered_length(seq_len, levels, pool, topk):
    """M: all coarsest entries, plus 128*p candidates per tile at each of the L-1 finer levels."""
    return seq_len // pool ** (levels - 1) + (levels - 1) * pool * topk


def tiles(seq_len, levels, pool, topk):
    """The selection's tiles: (number of tiles T = topk/128, coarsest entries per tile C).
    Tile t owns the coarsest entries [t*C, (t+1)*C), i.e. the tokens [t*C*p^(L-1), (t+1)*C*p^(L-1));
    the last tile also owns the remainder, up to N."""
    n_tiles = topk // TILE_KEEP
    return n_tiles, seq_len // pool ** (levels - 1) // n_tiles


# -----------------------------------------------------------------------------
# The reference: plain PyTorch, one function per step, in the order the layer runs them


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
        pyramid.append(finer.reshape(B, H, finer.shape[2] // pool, pool, D).mean(dim=3))
    return torch.cat(pyramid, dim=2)


def _max_over_group(scores, n_groups):
    """(B, H, N) per query head -> (B, G, N): the max over each kv group's query heads."""
    B, H, N = scores.shape
    return scores.view(B, n_groups, H // n_groups, N).amax(dim=2)



def ref_norm_scores(q, k):
    """Step 2a, the norm scorer. Per-token scores for each kv head: max over the group's query
    heads of ||q_t||, and ||k_t||; both (B, H_kv, N) in fp32.

    The squared norm is summed in fp64 so that the result does not depend on summation order:
    for bf16 inputs every term is exact, so both paths produce bitwise-equal scores and
    select the same entries. (bf16 norms tie constantly; fp32 is what the scores are kept in.)
    """
    q_norm = q.double().square().sum(-1).sqrt().float()  # (B, H, N)
    k_norm = k.double().square().sum(-1).sqrt().float()  # (B, G, N)
    return _max_over_group(q_norm, k.shape[1]), k_norm


def ref_dilated_scores(q, k, v, dilation):
    """Step 2a, the dilated scorer. Split the positions into `dilation` interleaved phases
    (t mod dilation) and run causal softmax attention inside each phase, twice:
        a_qk[t] = sum over s <= t in t's phase of softmax_s(q_t . k_s / sqrt(D)) v_s
        a_kq[t] = sum over s <= t in t's phase of softmax_s(k_t . q_s / sqrt(D)) v_s
    The q-score of token t is ||a_qk[t]||, its k-score ||a_kq[t]||, per query head, then the
    max over each kv group's query heads. fp32 throughout; returns two (B, H_kv, N) tensors.
    """
    B, H, N, D = q.shape
    G = k.shape[1]

    def phases(x):  # (B, H, N, D) -> (B, H, dilation, N/dilation, D): phase r holds r, r+d, r+2d, ...
        return x.float().reshape(B, H, N // dilation, dilation, D).transpose(2, 3)

    q_ph = phases(q)
    k_ph, v_ph = (phases(x.repeat_interleave(H // G, dim=1)) for x in (k, v))  # kv heads to query heads
    causal = torch.ones(N // dilation, N // dilation, dtype=torch.bool, device=q.device).tril()

    def attend(queries, keys):  # causal softmax attention inside each phase, over v
        logits = (queries @ keys.transpose(-1, -2)) / math.sqrt(D)  # (B, H, dilation, N/d, N/d)
        return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v_ph  # (B, H, dilation, N/d, D)

    def token_scores(a):  # (B, H, dilation, N/d, D) -> norms back in position order (B, H, N)
        return a.norm(dim=-1).transpose(2, 3).reshape(B, H, N)

    a_qk, a_kq = attend(q_ph, k_ph), attend(k_ph, q_ph)
    return _max_over_group(token_scores(a_qk), G), _max_over_group(token_scores(a_kq), G)


def ref_token_scores(q, k, v, scorer="norm", dilation=4):
    """Step 2a with the chosen scorer: (B, H_kv, N) q-scores and k-scores, fp32, no gradient."""
    with torch.no_grad():
        return ref_dilated_scores(q, k, v, dilation) if scorer == "dilated" else ref_norm_scores(q, k)



def ref_score_pyramid(token_scores, levels, pool):
    """Step 2b. Scores of coarser entries: the max over their tokens, as a max-pool of the level
    below. (B, G, N) -> concatenated (B, G, N + N/p + ...). Exact, so both paths share it."""
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

    This selection reads ahead. Given the selection the layer is exactly causal, but the
    selection itself is not: a span's score is the max over all its tokens, so whether the span
    holding token t is refined depends on t+1, t+2, ... (the cascade), and the 128 kept entries
    are chosen against every other entry of the tile, later ones included (the competition).
    Whether t gets fine-grained outputs thus depends on tokens up to the end of its tile, and a
    trained model learns to decode that: its Lighthouse-mode loss is optimistic (probe_lookahead.py
    measures by how much). ref_select_causal below cannot read ahead.
    """
    B, G, _ = q_score_pyr.shape
    offsets, _ = level_offsets(seq_len, levels, pool)
    top = levels - 1
    n_top = seq_len // pool**top
    n_tiles, tile = tiles(seq_len, levels, pool, topk)
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


@torch.no_grad()
def ref_select_causal(q_score_pyr, k_score_pyr, seq_len, levels, pool, topk):
    """Steps 3 and 4 without reading ahead (ours, not the paper's): whether an entry is selected
    depends only on the scores of tokens up to the entry's own last token.

    Every coarsest entry is selected. At each finer level, tile t (the tiles of ref_select) may
    select up to 128*p entries, as many as ref_select emits there. An entry passes if its q-score
    reaches the (64p)-th largest q-score of its level in tile t-1, or its k-score the (64p)-th
    largest k-score among the entries of tile t-1 that did not pass by q: the thresholds that pick
    exactly 128p entries of tile t-1 (without ties). Passing entries are taken in order until
    tile t's 128p are used; tile 0, with no tile before it, takes its first 128p entries. Levels
    are chosen independently: an entry does not need its parent. Every entry sits at the end of
    its span in the causal order (key b*L - L + lvl), as a node does in ref_select: a leaf at its
    start would let finer entries inside its span see it, and its span holds their future.

    Returns pyramid indices (B, G, M) int64 in causal order, M as for ref_select; the slots left
    unused (fewer entries pass than the budget allows) hold -1, at the end.
    """
    B, G, _ = q_score_pyr.shape
    offsets, _ = level_offsets(seq_len, levels, pool)
    n_tiles, tile = tiles(seq_len, levels, pool, topk)
    budget, half = TILE_KEEP * pool, HALF_KEEP * pool
    device = q_score_pyr.device
    unused = torch.iinfo(torch.int64).max  # the key of an entry that is not selected: sorts last

    keys = []
    for level in range(levels):
        n = seq_len // pool**level
        j = torch.arange(n, device=device)
        key = ((j + 1) * pool**level * levels - levels + level).expand(B, G, n)  # causal_key of a node
        if level < levels - 1 and n_tiles == 1:  # one tile, no thresholds: its first 128p entries
            # (a case of its own: the general code's index arithmetic on a single tile is rejected
            # by Inductor's GPU code generator)
            key = torch.where(j < budget, key, unused)
        elif level < levels - 1:
            width = tile * pool ** (levels - 1 - level)  # the level's entries in a tile (the last: more)
            q = q_score_pyr[:, :, offsets[level]:offsets[level] + n]  # (B, G, n)
            k = k_score_pyr[:, :, offsets[level]:offsets[level] + n]
            # thresholds of tiles 0 .. T-2: (B, G, n) -> (B, G, T-1, width) -> (B, G, T-1)
            q_prev = q[:, :, :(n_tiles - 1) * width].unflatten(2, (n_tiles - 1, width))
            k_prev = k[:, :, :(n_tiles - 1) * width].unflatten(2, (n_tiles - 1, width))
            q_prev_cut = q_prev.topk(half, dim=3).values[..., -1]
            k_rest = k_prev.masked_fill(q_prev >= q_prev_cut[..., None], float("-inf"))
            k_prev_cut = k_rest.topk(half, dim=3).values[..., -1]
            # tile t's thresholds are tile t-1's; tile 0 has none (-inf: every entry passes)
            none = torch.full((B, G, 1), float("-inf"), device=device)
            q_cut, k_cut = torch.cat([none, q_prev_cut], dim=2), torch.cat([none, k_prev_cut], dim=2)  # (B, G, T)
            in_tile = (j // width).clamp(max=n_tiles - 1)  # (n,) the tile of each entry
            passes = (q >= q_cut[:, :, in_tile]) | (k >= k_cut[:, :, in_tile])  # (B, G, n)
            # in order, up to the budget: count the passing entries from the start of their tile
            count = passes.long().cumsum(dim=2)  # (B, G, n)
            last_before = in_tile * width - 1  # (n,) the entry before the tile's first; -1 in tile 0
            before_tile = torch.where(last_before >= 0, count[:, :, last_before.clamp(min=0)], 0)  # (B, G, n)
            taken = passes & (count - before_tile <= budget)
            key = torch.where(taken, key, unused)
        keys.append(key)
    keys = torch.cat(keys, dim=2)  # (B, G, P), in pyramid-index order
    M = gathered_length(seq_len, levels, pool, topk)
    keys, order = keys.sort(dim=2)  # the selected entries first, in causal order (keys are unique)
    return torch.where(keys[:, :, :M] == unused, -1, order[:, :, :M])


def inverse_map(indices, pyramid_len):
    """(B, G, M) selected pyramid indices (-1: an unused slot) -> (B, G, pyramid_len) position in
    the gathered sequence, or -1 where the entry is not selected. Lets the scatter and backward
    passes be gathers."""
    B, G, M = indices.shape
    positions = torch.arange(M, device=indices.device).expand(B, G, M)
    inv = torch.full((B, G, pyramid_len + 1), -1, dtype=torch.int64, device=indices.device)
    # unused slots write to an extra last column, which is then dropped
    inv.scatter_(2, torch.where(indices >= 0, indices, pyramid_len), positions)
    return inv[:, :, :pyramid_len].contiguous()


def ref_gather(pyramid, indices):
    """Step 5a. pyramid (B, Hx, P, D), indices (B, G, M) -> (B, Hx, M, D): each head takes the
    entries its kv group selected (head h belongs to group h // (Hx / G)); unused slots (-1) get
    zero rows."""
    B, Hx, _, D = pyramid.shape
    per_group = indices.repeat_interleave(Hx // indices.shape[1], dim=1)  # (B, Hx, M)
    rows = pyramid.gather(2, per_group.clamp(min=0)[..., None].expand(-1, -1, -1, D))  # (B, Hx, M, D)
    return rows * (per_group >= 0)[..., None]



def last_token(indices, seq_len, levels, pool):
    """The last token (j+1)*p^lvl - 1 of the span of each pyramid index (any shape)."""
    offsets, _ = level_offsets(seq_len, levels, pool)
    span = torch.ones_like(indices)
    j = indices.clone()
    for lvl in range(1, levels):
        upper = indices >= offsets[lvl]
        span = torch.where(upper, pool**lvl, span)
        j = torch.where(upper, indices - offsets[lvl], j)
    return (j + 1) * span - 1


def rope_rotate(x, cos, sin):
    """Rotate each consecutive pair (x[..., 2i], x[..., 2i+1]) of x by the angle whose cos and sin
    are cos[..., i], sin[..., i] (broadcast against x's leading dims). Computed in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (..., D/2)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., D/2, 2)
    return rotated.flatten(-2).type_as(x)  # (..., D)


def ref_rope_at_span_end(x_sel, indices, cos, sin, seq_len, levels, pool):
    """Step 5b, RoPE at the span end. Rotate each gathered entry x_sel (B, Hx, M, D) of pyramid
    index indices (B, G, M) at the last token of its span: a level-0 entry at its own position,
    a node where the causal order places it. cos, sin: (>= N, D/2) tables."""
    pos = last_token(indices, seq_len, levels, pool).clamp(min=0)  # (B, G, M); unused slots: zero rows
    pos = pos.repeat_interleave(x_sel.shape[1] // indices.shape[1], dim=1)  # (B, Hx, M)
    return rope_rotate(x_sel, cos[pos], sin[pos])  # tables (B, Hx, M, D/2)


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


def lighthouse_reference(q, k, v, levels, pool, topk, scorer="norm", dilation=4, rope=None, selection="paper"):
    """The whole layer in plain PyTorch: q (B, H, N, D), k, v (B, H_kv, N, D) -> (B, H, N, D)."""
    _check_qkv(q, k, v, levels, pool, topk, scorer, dilation, rope, selection)
    B, H, N, D = q.shape
    G = k.shape[1]
    q_pyr, k_pyr, v_pyr = (ref_pyramid(x, levels, pool) for x in (q, k, v))  # (B, *, P, D)
    with torch.no_grad():
        q_tok, k_tok = ref_token_scores(q, k, v, scorer, dilation)  # (B, G, N) each
        q_score = ref_score_pyramid(q_tok, levels, pool)  # (B, G, P)
        k_score = ref_score_pyramid(k_tok, levels, pool)
        select = ref_select_causal if selection == "causal" else ref_select
        indices = select(q_score, k_score, N, levels, pool, topk)  # (B, G, M)
        inv = inverse_map(indices, q_score.shape[2])  # (B, G, P)
    q_sel, k_sel, v_sel = (ref_gather(x, indices) for x in (q_pyr, k_pyr, v_pyr))  # (B, H or G, M, D)
    if rope is not None:
        q_sel = ref_rope_at_span_end(q_sel, indices, *rope, N, levels, pool)
        k_sel = ref_rope_at_span_end(k_sel, indices, *rope, N, levels, pool)
    k_sel, v_sel = (x.repeat_interleave(H // G, dim=1) for x in (k_sel, v_sel))  # (B, G, M, D) -> (B, H, M, D)
    attn = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True)  # (B, H, M, D)
    return ref_scatter(attn, inv, N, levels, pool)


# -----------------------------------------------------------------------------
# The domain: what the layer accepts, checked before any work


def check_lighthouse_config(seq_len, levels, pool, topk, n_head=None, n_kv_head=None, scorer="norm", dilation=4,
                            selection="paper"):
    """Raise ValueError (saying what to change) unless the layer is defined for these settings.

    Rules: levels >= 2; pool a power of two >= 2; topk a positive multiple of 128; seq_len a
    multiple of pool^(levels-1) with at least 128 coarsest entries per tile, i.e.
    seq_len / pool^(levels-1) >= topk (topk / 128 tiles of >= 128 entries), and
    seq_len * levels < 2^31 (the causal sort key); n_head a multiple of n_kv_head; the dilated
    scorer needs seq_len to be a multiple of its dilation. Returns M, the gathered length.
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
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(map(repr, SELECTIONS))} (got {selection!r})")
    if scorer == "dilated":
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be an integer >= 1 (got {dilation!r}); the authors use 4")
        if seq_len % dilation:
            raise ValueError(f"sequence length {seq_len} must be a multiple of the dilated scorer's dilation "
                             f"{dilation}: nearest valid lengths {seq_len // dilation * dilation} or "
                             f"{(seq_len // dilation + 1) * dilation}, or another dilation")
    return gathered_length(seq_len, levels, pool, topk)



def _check_qkv(q, k, v, levels, pool, topk, scorer, dilation, rope, selection):
    """The layer's inputs, checked before any work: shapes, devices, dtypes, the domain."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, H, N, D) and k, v (B, H_kv, N, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k and v must match q in batch, length and head dim: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if D % 2 and rope is not None:
        raise ValueError(f"RoPE at the span end needs an even head dim (got {D})")
    tensors = dict(q=q, k=k, v=v)
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError("rope must be None or a pair (cos, sin) of tables (>= N, D/2)")
        tensors.update(cos=rope[0], sin=rope[1])
        for name in ("cos", "sin"):
            table = tensors[name]
            if table.dim() != 2 or table.shape[0] < N or table.shape[1] != D // 2:
                raise ValueError(f"rope {name} table must be (>= N, D/2) = (>= {N}, {D // 2}); "
                                 f"got {tuple(table.shape)}")
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: put all inputs on one device")
    for name in ("k", "v"):
        if tensors[name].dtype != q.dtype:
            raise ValueError(f"q, k, v must share a dtype: q is {q.dtype}, {name} is {tensors[name].dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must be float32, float16 or bfloat16 (got {q.dtype})")
    check_lighthouse_config(N, levels, pool, topk, n_head=H, n_kv_head=k.shape[1], scorer=scorer, dilation=dilation,
                            selection=selection)


# -----------------------------------------------------------------------------
# The Triton path
#
# Launches put blocks of rows (tokens or entries) on grid axis 0, which allows 2^31 - 1 programs,
# and the (batch, head) rows on axis 1, which allows 65535: so any length the domain admits
# launches. The pyramid of q, k, v is never stored: the gather averages each selected entry's
# span of tokens as it reads them, and its backward spreads the gradient back. Offsets are int64
# everywhere: at N = 512K the flat index into (B, H, N, D) passes 2^31. Tensors are read and
# written through their strides, so transposed inputs and gradients need no copies.


@triton.jit
def _level_start(N, level: tl.constexpr, POOL: tl.constexpr):
    """Offset of `level` in the concatenated pyramid layout: N + N/p + ... (level terms)."""
    start = N * 0
    for lvl in tl.static_range(level):
        start += N // (POOL**lvl)
    return start


@triton.jit
def _last_token(e, N, LEVELS: tl.constexpr, POOL: tl.constexpr):
    """Twin of last_token: for pyramid indices e, the span p^lvl and the span's last token."""
    span = e * 0 + 1
    j = e
    for lvl in tl.static_range(1, LEVELS):
        start = _level_start(N, lvl, POOL)
        span = tl.where(e >= start, POOL**lvl, span)
        j = tl.where(e >= start, e - start, j)
    return span, (j + 1) * span - 1


@triton.jit
def _rotate(rows, pos, cos_ptr, sin_ptr, s_rope, D, SIGN: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """Twin of rope_rotate for a block of rows (BLOCK_R, BLOCK_D) fp32, row r rotated at position
    pos[r]; SIGN = -1 rotates by the negative angle (the adjoint, for the backward pass)."""
    i = tl.arange(0, BLOCK_D // 2)
    ok = (pos >= 0)[:, None] & (i < D // 2)[None, :]
    cos = tl.load(cos_ptr + pos[:, None] * s_rope + i[None, :], mask=ok, other=1.0)
    sin = tl.load(sin_ptr + pos[:, None] * s_rope + i[None, :], mask=ok, other=0.0) * SIGN
    # (BLOCK_R, BLOCK_D) -> (BLOCK_R, BLOCK_D/2, 2) -> the even and the odd element of each pair
    even, odd = tl.split(tl.reshape(rows, [BLOCK_R, BLOCK_D // 2, 2]))
    rotated = tl.join(even * cos - odd * sin, even * sin + odd * cos)  # (BLOCK_R, BLOCK_D/2, 2)
    return tl.reshape(rotated, [BLOCK_R, BLOCK_D])


@triton.jit
def _norm_score_kernel(x_ptr, sx_b, sx_h, sx_n, score_ptr, N, S, D, G: tl.constexpr, GROUP: tl.constexpr,
                       LEVELS: tl.constexpr, POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Twin of ref_norm_scores + ref_score_pyramid for one tensor: score[b, g, t] = max over the
    GROUP heads of kv group g of ||x[b, h, t]||, via squared norms summed in fp64 (exact for bf16
    and fp32 terms); then levels 1..LEVELS-1, the max over each span of this block's tokens (so
    the block must hold whole coarsest spans). Rows of `score` are S long: P, or N for level 0 only."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    bg = tl.program_id(1).to(tl.int64)
    b, g = bg // G, bg % G
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < N, d < D
    best = tl.zeros([BLOCK_T], dtype=tl.float64)  # largest squared norm over the group
    for i in range(GROUP):
        x = tl.load(x_ptr + b * sx_b + (g * GROUP + i) * sx_h + t[:, None] * sx_n + d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float64)  # (BLOCK_T, BLOCK_D)
        best = tl.maximum(best, tl.sum(x * x, axis=1))
    score = tl.sqrt(best).to(tl.float32)  # (BLOCK_T,); the fp64 square root is correctly rounded
    tl.store(score_ptr + bg * S + t, score, mask=t_ok)
    for lvl in tl.static_range(1, LEVELS):
        # (BLOCK_T,) -> (BLOCK_T / p^lvl, p^lvl) -> the max over each span: (BLOCK_T / p^lvl,)
        pooled = tl.max(tl.reshape(score, [BLOCK_T // POOL**lvl, POOL**lvl]), axis=1)
        j = tl.program_id(0) * (BLOCK_T // POOL**lvl) + tl.arange(0, BLOCK_T // POOL**lvl).to(tl.int64)
        tl.store(score_ptr + bg * S + _level_start(N, lvl, POOL) + j, pooled, mask=j < N // POOL**lvl)


@triton.jit
def _score_key(score, rank, RANK_BITS: tl.constexpr):
    """An int64 key that orders candidates as ref_keep does: by fp32 score (any sign; -0.0 equals
    +0.0), ties broken by the lower rank. Keys are >= 0 and distinct for distinct ranks.

    The bit pattern of a float orders like its value only for non-negative floats; for negative
    ones, flipping the 31 magnitude bits reverses their order below all non-negative ones."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648  # [0, 2^32)
    return (ordered << RANK_BITS) | ((1 << RANK_BITS) - 1 - rank)


@triton.jit
def _candidate_keys(work_ptr, list_start, n, start, q_ptr, k_ptr, q_cut, BY_K: tl.constexpr,
                    CHUNK: tl.constexpr, RANK_BITS: tl.constexpr):
    """Keys of candidates start .. start+CHUNK-1 of a list of n pyramid indices in `work` (-1 past
    the end): by q-score, or (BY_K) by k-score with those kept by q (key >= q_cut) left out."""
    r = start + tl.arange(0, CHUNK).to(tl.int64)
    ok = r < n
    e = tl.load(work_ptr + list_start + r, mask=ok, other=0, cache_modifier=".cg")
    key = _score_key(tl.load(q_ptr + e, mask=ok, other=0.0), r, RANK_BITS)
    if BY_K:
        key = tl.where(key >= q_cut, -1, _score_key(tl.load(k_ptr + e, mask=ok, other=0.0), r, RANK_BITS))
    return tl.where(ok, key, -1)


@triton.jit
def _kth_largest_key(key, K: tl.constexpr, NBITS: tl.constexpr):
    """The K-th largest of distinct non-negative int64 keys (-1 = absent) held in registers, found
    bit by bit from the top: the largest threshold with at least K keys at or above it. Only
    counts, no sort."""
    threshold = tl.zeros([], dtype=tl.int64)
    for i in range(NBITS):
        trial = threshold | (threshold * 0 + 1) << (NBITS - 1 - i)
        threshold = tl.where(tl.sum((key >= trial).to(tl.int32), axis=0) >= K, trial, threshold)
    return threshold


@triton.jit
def _kth_largest_streamed(work_ptr, list_start, n, q_ptr, k_ptr, q_cut, BY_K: tl.constexpr, HALF: tl.constexpr,
                          CHUNK: tl.constexpr, RANK_BITS: tl.constexpr):
    """_kth_largest_key for a list longer than one chunk (see _candidate_keys): every bit re-reads
    the list chunk by chunk, so that a tile of any size fits in a program."""
    NBITS: tl.constexpr = 32 + RANK_BITS
    threshold = tl.zeros([], dtype=tl.int64)
    for i in range(NBITS):
        trial = threshold | (threshold * 0 + 1) << (NBITS - 1 - i)
        count = 0
        for start in range(0, n, CHUNK):
            chunk = _candidate_keys(work_ptr, list_start, n, start, q_ptr, k_ptr, q_cut, BY_K, CHUNK, RANK_BITS)
            count += tl.sum((chunk >= trial).to(tl.int32), axis=0)
        threshold = tl.where(count >= HALF, trial, threshold)
    return threshold


@triton.jit
def _select_level(work_ptr, list_start, n, q_ptr, k_ptr, N, lvl: tl.constexpr, LEVELS: tl.constexpr,
                  POOL: tl.constexpr, HALF: tl.constexpr, SINGLE: tl.constexpr, CHUNK: tl.constexpr,
                  RANK_BITS: tl.constexpr):
    """One level of ref_select in one tile. The list work[list_start : list_start+n] holds this
    level's candidates (pyramid indices, ascending); ref_keep's choice is made (no choice at
    level 0: all leaves) and each candidate is overwritten in place by its code
    (causal key << 32 | pyramid index). The kept candidates' children, ascending, are written as
    the next list, right after this one."""
    if lvl > 0:
        if SINGLE:  # the list fits one chunk: its keys stay in registers for both thresholds
            r = tl.arange(0, CHUNK).to(tl.int64)
            ok = r < n
            e = tl.load(work_ptr + list_start + r, mask=ok, other=0, cache_modifier=".cg")
            q_key = tl.where(ok, _score_key(tl.load(q_ptr + e, mask=ok, other=0.0), r, RANK_BITS), -1)
            k_key = tl.where(ok, _score_key(tl.load(k_ptr + e, mask=ok, other=0.0), r, RANK_BITS), -1)
            q_cut = _kth_largest_key(q_key, HALF, 32 + RANK_BITS)
            k_cut = _kth_largest_key(tl.where(q_key >= q_cut, -1, k_key), HALF, 32 + RANK_BITS)
        else:
            none = tl.full([], -1, dtype=tl.int64)
            q_cut = _kth_largest_streamed(work_ptr, list_start, n, q_ptr, k_ptr, none, False, HALF, CHUNK, RANK_BITS)
            k_cut = _kth_largest_streamed(work_ptr, list_start, n, q_ptr, k_ptr, q_cut, True, HALF, CHUNK, RANK_BITS)
    next_start = list_start + n
    written = next_start * 0  # children written so far
    for start in range(0, n, CHUNK):
        r = start + tl.arange(0, CHUNK).to(tl.int64)
        ok = r < n
        e = tl.load(work_ptr + list_start + r, mask=ok, other=0, cache_modifier=".cg")
        j = e - _level_start(N, lvl, POOL)
        if lvl > 0:
            by_q = _score_key(tl.load(q_ptr + e, mask=ok, other=0.0), r, RANK_BITS) >= q_cut
            by_k = _score_key(tl.load(k_ptr + e, mask=ok, other=0.0), r, RANK_BITS) >= k_cut
            kept = ok & (by_q | by_k)
        else:
            kept = r < 0
        key = tl.where(kept, (j + 1) * POOL**lvl * LEVELS - LEVELS + lvl, j * POOL**lvl * LEVELS)  # causal_key
        tl.debug_barrier()  # every thread has read this chunk before it is overwritten
        tl.store(work_ptr + list_start + r, (key << 32) | e, mask=ok)
        if lvl > 0:
            # the k-th kept entry's children go to slots k*p .. k*p + p-1 of the next list
            slot = written + tl.cumsum(kept.to(tl.int64), axis=0) - 1  # (CHUNK,)
            c = tl.arange(0, POOL)[None, :]
            child = _level_start(N, lvl - 1, POOL) + j[:, None] * POOL + c  # (CHUNK, p)
            tl.store(work_ptr + next_start + slot[:, None] * POOL + c, child, mask=kept[:, None])
            written += tl.sum(kept.to(tl.int64), axis=0)


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
                   LEVELS: tl.constexpr, POOL: tl.constexpr, KEEP: tl.constexpr, HALF: tl.constexpr,
                   CHUNK: tl.constexpr, TOP_SINGLE: tl.constexpr, TOP_BITS: tl.constexpr,
                   FINE_SINGLE: tl.constexpr, FINE_BITS: tl.constexpr):
    """Twin of ref_select for one (tile, batch*kv head): selection and causal order.

    Tiles own disjoint token ranges, so the global causal order is the tiles' orders one after
    another, and each tile's slice of the output has a size known in advance. Within a tile, the
    candidates of each level, emitted in ascending index order, are already in causal-key order
    (see causal_key), so the tile's order is a merge of L sorted lists: an entry's position is
    its rank in its own list plus, for every other list, the number of smaller keys there.
    The lists live in `work` (same layout as idx): list 0 holds the coarsest level's candidates,
    list 1 the next level's (KEEP * p), and so on; every list is processed CHUNK entries at a time.
    KEEP = TILE_KEEP and HALF = HALF_KEEP: entries kept per tile and level, and kept by each score.
    """
    tile = tl.program_id(0).to(tl.int64)
    bg = tl.program_id(1).to(tl.int64)
    TOP: tl.constexpr = LEVELS - 1
    FINE: tl.constexpr = KEEP * POOL  # the candidates of each finer level: the kept entries' children
    FINE_STEPS: tl.constexpr = FINE_BITS + 1  # halvings that empty a finer list in _count_below
    n_top = tl.where(tile == N_TILES - 1, N_TOP - tile * TILE, TILE)  # the last tile takes the rest
    slice_start = bg * M + tile * (TILE + TOP * FINE)  # this tile's slice of idx and work
    q_ptr, k_ptr = q_score_ptr + bg * P, k_score_ptr + bg * P

    # List 0: every coarsest entry of the tile is a candidate.
    for start in range(0, n_top, CHUNK):
        r = start + tl.arange(0, CHUNK).to(tl.int64)
        tl.store(work_ptr + slice_start + r, _level_start(N, TOP, POOL) + tile * TILE + r, mask=r < n_top)
    tl.debug_barrier()
    _select_level(work_ptr, slice_start, n_top, q_ptr, k_ptr, N, TOP, LEVELS, POOL, HALF, TOP_SINGLE, CHUNK, TOP_BITS)
    for lvl in tl.static_range(TOP - 1, -1, -1):
        tl.debug_barrier()  # the children were stored by other threads
        list_start = slice_start + n_top + (TOP - 1 - lvl) * FINE
        _select_level(work_ptr, list_start, FINE, q_ptr, k_ptr, N, lvl, LEVELS, POOL, HALF, FINE_SINGLE, CHUNK,
                      FINE_BITS)

    # Merge the L sorted lists into causal order.
    tl.debug_barrier()
    for a in tl.static_range(LEVELS):
        a_start = slice_start if a == 0 else slice_start + n_top + (a - 1) * FINE
        a_len = n_top if a == 0 else N_TOP * 0 + FINE
        for start in range(0, a_len, CHUNK):
            r = start + tl.arange(0, CHUNK).to(tl.int64)
            ok = r < a_len
            code = tl.load(work_ptr + a_start + r, mask=ok, other=0, cache_modifier=".cg")
            pos = r
            for b in tl.static_range(LEVELS):
                if b != a:
                    if b == 0:
                        pos += _count_below(work_ptr, slice_start, n_top, code, TOP_BITS + 1)
                    else:
                        pos += _count_below(work_ptr, slice_start + n_top + (b - 1) * FINE, FINE, code, FINE_STEPS)
            e = code & 0xFFFFFFFF
            tl.store(idx_ptr + slice_start + pos, e, mask=ok)
            tl.store(inv_ptr + bg * P + e, slice_start - bg * M + pos, mask=ok)


@triton.jit
def _gather_kernel(x_ptr, sx_b, sx_h, sx_n, idx_ptr, cos_ptr, sin_ptr, s_rope, out_ptr, N, M, D,
                   HX: tl.constexpr, G: tl.constexpr, LEVELS: tl.constexpr, POOL: tl.constexpr,
                   ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Twin of ref_pyramid + ref_gather (and, with ROPE, of ref_rope_at_span_end): out[b, h, m] =
    pyramid row idx[b, group(h), m] of head h, i.e. the mean of x over that entry's span of p^lvl
    tokens (fp32 sums), read straight from x: the pyramid itself is never stored."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HX, bh % HX
    g = h // (HX // G)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < M, d < D
    e = tl.load(idx_ptr + (b * G + g) * M + m, mask=m_ok, other=-1)  # (BLOCK_M,) pyramid indices
    used = e >= 0  # an unused slot (-1, ref_select_causal) gets a zero row
    span, last = _last_token(e, N, LEVELS, POOL)  # (BLOCK_M,) each: p^lvl, and the span's last token
    rows = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r in range(0, tl.max(tl.where(used, span, 1))):  # the widest span among this block's entries
        token = last - span + 1 + r  # (BLOCK_M,): the r-th token of each entry's span
        rows += tl.load(x_ptr + b * sx_b + h * sx_h + token[:, None] * sx_n + d[None, :],
                        mask=(used & (r < span))[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    rows = rows / span[:, None]
    if ROPE:
        rows = _rotate(rows, tl.where(m_ok, last, -1), cos_ptr, sin_ptr, s_rope, D, 1, BLOCK_M, BLOCK_D)
    tl.store(out_ptr + (bh * M + m)[:, None] * D + d[None, :], rows.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_backward_kernel(grad_ptr, sg_b, sg_h, sg_m, inv_ptr, cos_ptr, sin_ptr, s_rope, dx_ptr,
                            sdx_b, sdx_h, sdx_n, N, P, D, HX: tl.constexpr, G: tl.constexpr,
                            LEVELS: tl.constexpr, POOL: tl.constexpr, ROPE: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adjoint of pyramid + gather (+ rotation), fused: dx[t] = sum over levels of the gradient of
    the entry containing t, rotated back by its angle, divided by its span. Each token is written
    once."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HX, bh % HX
    g = h // (HX // G)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < N, d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for lvl in tl.static_range(LEVELS):
        # position in the gathered sequence of the level-lvl entry that contains t (-1: none)
        pos = tl.load(inv_ptr + (b * G + g) * P + _level_start(N, lvl, POOL) + t // POOL**lvl,
                      mask=t_ok, other=-1)
        rows = tl.load(grad_ptr + b * sg_b + h * sg_h + pos[:, None] * sg_m + d[None, :],
                       mask=(pos >= 0)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if ROPE:
            span_end = (t // POOL**lvl + 1) * POOL**lvl - 1  # where that entry was rotated
            rows = _rotate(rows, tl.where(pos >= 0, span_end, -1), cos_ptr, sin_ptr, s_rope, D, -1, BLOCK_T,
                           BLOCK_D)
        acc += rows / POOL**lvl
    tl.store(dx_ptr + b * sdx_b + h * sdx_h + t[:, None] * sdx_n + d[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_kernel(attn_ptr, sa_b, sa_h, sa_m, inv_ptr, out_ptr, so_b, so_h, so_n, N, P, D,
                    H: tl.constexpr, G: tl.constexpr, LEVELS: tl.constexpr, POOL: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Twin of ref_scatter: out[t] = sum over levels of attn[entry (lvl, (t+1) // p^lvl - 1)] where
    selected: a gather through the inverse map, so every output row is written once (no atomics)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < N, d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for lvl in tl.static_range(LEVELS):
        j = (t + 1) // POOL**lvl - 1  # most recently completed entry of this level
        pos = tl.load(inv_ptr + (b * G + g) * P + _level_start(N, lvl, POOL) + j,
                      mask=t_ok & (j >= 0), other=-1)
        acc += tl.load(attn_ptr + b * sa_b + h * sa_h + pos[:, None] * sa_m + d[None, :],
                       mask=(pos >= 0)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + b * so_b + h * so_h + t[:, None] * so_n + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_backward_kernel(grad_ptr, sg_b, sg_h, sg_n, idx_ptr, dattn_ptr, N, M, D, H: tl.constexpr,
                             G: tl.constexpr, LEVELS: tl.constexpr, POOL: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adjoint of ref_scatter: d attn[m] = sum of grad over the window [a+c-1, a+2c-1) ∩ [0, N)
    that entry idx[m] (covering [a, a+c)) fed."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    g = h // (H // G)
    d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = m < M, d < D
    e = tl.load(idx_ptr + (b * G + g) * M + m, mask=m_ok, other=-1)  # -1: an unused slot, fed nothing
    span, first = _last_token(e, N, LEVELS, POOL)  # the window starts at the entry's own last token
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(POOL ** (LEVELS - 1)):  # the widest window; narrower entries mask the rest
        t = first + i
        ok = (e >= 0) & (i < span) & (t < N)
        acc += tl.load(grad_ptr + b * sg_b + h * sg_h + t[:, None] * sg_n + d[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(dattn_ptr + (bh * M + m)[:, None] * D + d[None, :], acc.to(dattn_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# The softmax weights (in [0, 1]) are multiplied by this before they are cast to FP8 for the
# product with the values: a power of two, so scaling is exact; the largest weight becomes 256,
# below e4m3's largest finite value (448), and weights down to 2^-17 instead of 2^-9 stay above zero.
FP8_WEIGHT_SCALE = tl.constexpr(256.0)


@triton.jit
def _dilated_attend(acc, l_i, m_i, qry, i, lo, hi, key_ptrs, key_step, val_ptrs, val_step, n_phase, logit_scale,
                    key_scale, val_scale, DIAGONAL: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The keys at phase positions lo .. hi-1, BLOCK_N at a time, into the online softmax of the
    query rows at phase positions i: m_i is each row's largest logit so far (in log2 units), l_i
    the sum of exp2(logit - m_i), acc the sum of those weights times the value rows. key_ptrs,
    val_ptrs (BLOCK_N, BLOCK_D) point at the rows of the block at lo; the next block's rows lie
    BLOCK_N * step elements on. The blocks before the diagonal lie in every query row's past; the
    DIAGONAL ones need the causal mask, and only they can reach past the phase's end."""
    d_ok = tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # phase positions of this block's keys
        ok = d_ok
        if DIAGONAL:
            ok = ok & (j < n_phase)[:, None]
        key = tl.load(key_ptrs, mask=ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        val = tl.load(val_ptrs, mask=ok, other=0.0)
        if FP8:
            key = (key.to(tl.float32) * key_scale).to(tl.float8e4nv)
            val = (val.to(tl.float32) * val_scale).to(tl.float8e4nv)
        logits = tl.dot(qry, tl.trans(key), input_precision=DOT_PRECISION) * logit_scale  # (BLOCK_M, BLOCK_N)
        if DIAGONAL:
            logits = tl.where(j[None, :] <= i[:, None], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        weights = tl.exp2(logits - m_new[:, None])  # (BLOCK_M, BLOCK_N), each in [0, 1]
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(weights, axis=1)
        if FP8:
            weights = (weights * FP8_WEIGHT_SCALE).to(tl.float8e4nv)
        else:
            weights = weights.to(val.dtype)
        acc = acc * alpha[:, None] + tl.dot(weights, val, input_precision=DOT_PRECISION)
        m_i = m_new
        key_ptrs += BLOCK_N * key_step
        val_ptrs += BLOCK_N * val_step
    return acc, l_i, m_i


@triton.jit
def _dilated_norms_kernel(qry_ptr, sq_b, sq_h, sq_n, key_ptr, sk_b, sk_h, sk_n, val_ptr, sv_b, sv_h, sv_n,
                          qry_scale_ptr, key_scale_ptr, val_scale_ptr, norm_ptr, N, sm_scale, H, qry_group,
                          key_group, val_group, DILATION: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One pass of ref_dilated_scores, before the max over groups, flash-style: for query head h,
    norm[b, h, t] = || sum over s <= t in t's phase of softmax_s(qry_t . key_s / sqrt(D)) val_s ||,
    for one block of BLOCK_M positions of one phase. The output rows stay in registers; only
    their fp32 norms are written. Head h reads head h // qry_group of qry (and so on for key and
    val): the pass a_qk has queries q (qry_group 1) over keys k, a_kq queries k over keys q.
    (The head counts are runtime arguments: shapes that differ only in heads share a compiled kernel.)

    FP8: the matrix products take e4m3 operands. q, k, v are scaled per (batch, head) by the
    powers of two in *_scale_ptr (see _fp8_scales), the softmax weights by FP8_WEIGHT_SCALE; the
    logits and the norm are divided by the same factors, in fp32."""
    n_phase = N // DILATION
    # the last blocks of a phase attend over the most keys: launch them first, and the short
    # ones fill in at the end
    m_block = tl.cdiv(n_phase, BLOCK_M) - 1 - tl.program_id(0) // DILATION
    r = tl.program_id(0) % DILATION  # the phase: positions r, r + d, r + 2d, ...
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hq, hk, hv = h // qry_group, h // key_group, h // val_group  # the heads read from each tensor
    # Phase position i is row t = r + d*i: phase r of a tensor is its rows from r on, d apart.
    # Row offsets t * stride can pass 2^31 at long lengths, so they are int64, except the offsets
    # of a key block's rows from its first row, which stay small.
    diagonal = m_block * BLOCK_M  # phase position of the first query row, and of the diagonal key block
    i = diagonal + tl.arange(0, BLOCK_M)  # this block's query rows, as phase positions
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    qry = tl.load(qry_ptr + b * sq_b + hq * sq_h + (r + DILATION * i.to(tl.int64))[:, None] * sq_n + d[None, :],
                  mask=(i < n_phase)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    # (BLOCK_N, BLOCK_D) pointers to the first key block's rows (phase positions 0 .. BLOCK_N-1)
    key_ptrs = key_ptr + b * sk_b + hk * sk_h + r * sk_n + (n[:, None] * DILATION * sk_n + d[None, :])
    val_ptrs = val_ptr + b * sv_b + hv * sv_h + r * sv_n + (n[:, None] * DILATION * sv_n + d[None, :])
    logit_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    key_scale, val_scale = 1.0, 1.0
    if FP8:
        qry_scale = tl.load(qry_scale_ptr + b * (H // qry_group) + hq)
        key_scale = tl.load(key_scale_ptr + b * (H // key_group) + hk)
        val_scale = tl.load(val_scale_ptr + b * (H // val_group) + hv)
        qry = (qry.to(tl.float32) * qry_scale).to(tl.float8e4nv)
        logit_scale = logit_scale / (qry_scale * key_scale)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _dilated_attend(acc, l_i, m_i, qry, i, 0, diagonal, key_ptrs, DILATION * sk_n, val_ptrs,
                                    DILATION * sv_n, n_phase, logit_scale, key_scale, val_scale, False, FP8,
                                    DOT_PRECISION, HEAD_DIM, BLOCK_N, BLOCK_D)
    to_diagonal = diagonal.to(tl.int64) * DILATION  # rows from the first key to the diagonal block's
    acc, l_i, m_i = _dilated_attend(acc, l_i, m_i, qry, i, diagonal, diagonal + BLOCK_M, key_ptrs + to_diagonal * sk_n,
                                    DILATION * sk_n, val_ptrs + to_diagonal * sv_n, DILATION * sv_n, n_phase,
                                    logit_scale, key_scale, val_scale, True, FP8, DOT_PRECISION, HEAD_DIM, BLOCK_N,
                                    BLOCK_D)
    out = acc / l_i[:, None]  # (BLOCK_M, BLOCK_D) the attention outputs (in FP8, times the two scales below)
    norm = tl.sqrt(tl.sum(out * out, axis=1))
    if FP8:
        norm = norm / (FP8_WEIGHT_SCALE * val_scale)
    tl.store(norm_ptr + bh * N + r + DILATION * i, norm, mask=i < n_phase)


# -----------------------------------------------------------------------------
# Host wrappers: allocate the outputs and launch the kernels

# Rows (tokens or entries) per program. Triton's CPU interpreter runs every program as Python,
# so there fewer, larger programs keep the tests fast; on a GPU, 64 rows of 128 dims fill a program.
ROWS = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 64
# Candidates the selection kernel handles at once; a tile's list longer than this is read in chunks.
SELECT_CHUNK = 2048
# The fused dilated scorer's query rows per program and key rows per step (BLOCK_M a multiple of
# BLOCK_N): on a GPU 128 x 64, the usual flash-attention tile for a head dim of 128; larger in
# the interpreter, as for ROWS.
DILATED_BLOCK_M, DILATED_BLOCK_N = (512, 512) if os.environ.get("TRITON_INTERPRET") == "1" else (128, 64)
# The dilated scorer on the Triton path (triton_dilated_scores): "fp8" (the fused kernel, matrix
# products in FP8 e4m3), "fused" (the fused kernel, matrix products in the inputs' dtype), "sdpa"
# (sdpa_dilated_scores, two SDPA passes, the readable twin) or "auto": "fp8" on GPUs with FP8
# tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell), else "fused".
# The default stays "sdpa", the measured path, until the fused kernel has run on a GPU (its
# tests there, its speed, and how often FP8 scores change the selection).
DILATED_KERNEL = "sdpa"
DILATED_KERNELS = ("auto", "fp8", "fused", "sdpa")


# The host code's own cdiv and next_power_of_2. Triton's (triton.cdiv, triton.next_power_of_2) are
# "constexpr functions" made for kernels: called from Python, each first unwraps its arguments,
# about 4 us on a CPU, and one fwd+bwd call of the layer makes 28 such calls.
def _cdiv(a, b):
    return (a + b - 1) // b


def _next_power_of_2(n):
    return 1 << (n - 1).bit_length()


def _grid(n_rows, rows_per_program, n_heads):
    """Launch grid: blocks of rows on axis 0 (at most 2^31 - 1), batch * heads on axis 1 (at most
    65535, checked by lighthouse_triton before any launch)."""
    return (_cdiv(n_rows, rows_per_program), n_heads)


def _on_device(t):
    """Launch on t's GPU even when another one is current. Switching devices (and back) costs host
    time, so this is a no-op when t's GPU is already the current one, as usual, and on the CPU."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _like_layout(shape, seq_major, dtype, device):
    """An empty (B, h, n, D) tensor laid out as (B, n, h, D) in memory if seq_major."""
    B, h, n, D = shape
    if seq_major:
        return torch.empty(B, n, h, D, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(B, h, n, D, dtype=dtype, device=device)


def _score_pyramid_like(q, k, levels, pool):
    """An empty (B, G, P) fp32 score pyramid for q (B, H, N, D), k (B, G, N, D)."""
    _, P = level_offsets(q.shape[2], levels, pool)
    return torch.empty(q.shape[0], k.shape[1], P, dtype=torch.float32, device=q.device)


def _launch_norm_scores(q, k, levels, pool):
    """Twin of ref_norm_scores + ref_score_pyramid: the (B, G, P) fp32 score pyramids of q and k.

    The kernel max-pools the coarser levels itself when a block of ROWS tokens holds whole
    coarsest spans (pool^(levels-1) <= ROWS, every config in config/); otherwise it writes the
    token scores and ref_score_pyramid, exact too, adds the levels above."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    B, H, N, D = q.shape
    G = k.shape[1]
    fused = pool ** (levels - 1) <= ROWS
    pyramids = []
    with _on_device(q):
        for x in (q, k):
            score = _score_pyramid_like(q, k, levels if fused else 1, pool)  # (B, G, P), or (B, G, N)
            _norm_score_kernel[_grid(N, ROWS, B * G)](
                x, *x.stride()[:3], score, N, score.shape[2], D, G=G, GROUP=x.shape[1] // G,
                LEVELS=levels if fused else 1, POOL=pool, BLOCK_T=ROWS, BLOCK_D=_next_power_of_2(D),
                num_warps=4)
            pyramids.append(score if fused else ref_score_pyramid(score, levels, pool))
    return pyramids[0], pyramids[1]


@torch.no_grad()
def sdpa_dilated_scores(q, k, v, dilation):
    """Twin of ref_dilated_scores, and the readable twin of the fused kernel (_launch_dilated_scores):
    the two strided attention passes through SDPA (cuDNN or flash) in the input dtype, the norms
    in fp32. It writes both passes' outputs, (B, d*H, N/d, D) each, to take their norms.

    Seen as (B, N/d, d, heads, D), a (B, N, heads, D) tensor is already phase-major: merging the
    (d, heads) dims gives d*heads independent "heads" of N/d positions each, phase r's copy of
    head h at index r*heads + h. With that order a query head's kv head is found by SDPA's own
    grouped-query rule (index // (H/G)), so a_qk needs no copies of k and v."""
    B, H, N, D = q.shape
    G = k.shape[1]

    def phases(x):  # (B, h, N, D) -> (B, d*h, N/d, D); a view when x is laid out as (B, N, h, D)
        h = x.shape[1]
        return x.transpose(1, 2).reshape(B, N // dilation, dilation * h, D).transpose(1, 2)

    def token_scores(a):  # (B, d*H, N/d, D) -> fp32 norms in position order, max over groups (B, G, N)
        norms = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)  # (B, d*H, N/d)
        norms = norms.view(B, dilation, H, N // dilation).permute(0, 2, 3, 1).reshape(B, H, N)
        return _max_over_group(norms, G)

    a_qk = F.scaled_dot_product_attention(phases(q), phases(k), phases(v), is_causal=True, enable_gqa=G != H)
    # keys over queries: each query head reads its own keys, so k and v go to every query head
    k_all, v_all = (x.repeat_interleave(H // G, dim=1) for x in (k, v))  # (B, H, N, D)
    a_kq = F.scaled_dot_product_attention(phases(k_all), phases(q), phases(v_all), is_causal=True)
    return token_scores(a_qk), token_scores(a_kq)


def _has_fp8(device):
    """Whether `device` is a GPU with FP8 tensor cores (compute capability 8.9 or higher)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_scales(x):
    """FP8 scales of x (B, h, N, D), one per (batch, head): the power of two s that puts the
    head's largest |element| in [128, 256), so that no element passes e4m3's 448 and the small
    ones keep as many of e4m3's binades (down to 2^-9) as possible; a power of two, so scaling
    loses nothing. Returns (B, h) fp32."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=(2, 3), dtype=torch.float32)  # (B, h)
    _, exponent = torch.frexp(amax.clamp(min=2.0**-100))  # amax < 2^exponent; a head of zeros: any scale works
    return torch.ldexp(torch.ones_like(amax), 8 - exponent)


def _launch_dilated_scores(q, k, v, dilation, kernel):
    """Twin of ref_dilated_scores, fused (see _dilated_norms_kernel): both attention passes
    flash-style, writing only each output row's fp32 norm, never the (B, d*H, N/d, D) outputs.
    q, k, v are read through their strides. kernel: "fp8", "fused" (the inputs' dtype) or "auto"."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, H, N, D = q.shape
    G = k.shape[1]
    fp8 = kernel == "fp8" or (kernel == "auto" and _has_fp8(q.device))
    if fp8 and not _has_fp8(q.device):
        raise ValueError(f"the FP8 dilated scorer needs a GPU with FP8 tensor cores (compute capability >= 8.9), "
                         f"not {q.device}: set lighthouse_kernel.DILATED_KERNEL to 'auto' or 'fused'")
    scales = [_fp8_scales(x) for x in (q, k, v)] if fp8 else [q, q, q]  # (B, heads) each; unread without FP8
    norms = torch.empty(2, B, H, N, dtype=torch.float32, device=q.device)  # per query head: a_qk's, a_kq's
    # a tensor, its FP8 scales, and how many query heads share each of its heads
    q_in, k_in = (q, scales[0], 1), (k, scales[1], H // G)
    grid = (dilation * _cdiv(N // dilation, DILATED_BLOCK_M), B * H)
    with _on_device(q):
        # a_qk: queries q over keys k; a_kq: queries k over keys q; values v in both
        for norm, (qry, qry_scale, qry_group), (key, key_scale, key_group) in zip(norms, (q_in, k_in), (k_in, q_in)):
            _dilated_norms_kernel[grid](
                qry, *qry.stride()[:3], key, *key.stride()[:3], v, *v.stride()[:3], qry_scale, key_scale, scales[2],
                norm, N, 1 / math.sqrt(D), H, qry_group, key_group, H // G, DILATION=dilation, FP8=fp8,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no TF32 rounding
                HEAD_DIM=D, BLOCK_M=DILATED_BLOCK_M, BLOCK_N=DILATED_BLOCK_N,
                BLOCK_D=max(32, _next_power_of_2(D)),  # tl.dot needs K >= 16, FP8 K >= 32
                # three blocks of keys and values in flight: 96 KiB of shared memory for bf16 inputs
                # (128 KiB on Hopper, which keeps the queries there too); fp32 tiles run unpipelined
                num_warps=8, num_stages=1 if q.dtype == torch.float32 else 3)
    return _max_over_group(norms[0], G), _max_over_group(norms[1], G)


def _launch_select(q_score_pyr, k_score_pyr, seq_len, levels, pool, topk):
    """Twin of ref_select on score pyramids (B, G, P). Returns the selected pyramid indices in
    causal order (B, G, M) int64 and the inverse map (B, G, P) int64."""
    B, G, P = q_score_pyr.shape
    M = gathered_length(seq_len, levels, pool, topk)
    n_tiles, tile = tiles(seq_len, levels, pool, topk)
    n_top = seq_len // pool ** (levels - 1)
    widest = tile + n_top % n_tiles  # the last tile's coarsest candidates
    fine = TILE_KEEP * pool
    chunk = min(SELECT_CHUNK, _next_power_of_2(max(widest, fine)))
    idx = torch.empty(B, G, M, dtype=torch.int64, device=q_score_pyr.device)
    work = torch.empty_like(idx)  # per-level candidate lists, see _select_kernel
    inv = torch.full((B, G, P), -1, dtype=torch.int64, device=q_score_pyr.device)
    with _on_device(q_score_pyr):
        _select_kernel[(n_tiles, B * G)](
            q_score_pyr.contiguous(), k_score_pyr.contiguous(), idx, inv, work, seq_len, P, M, n_top, tile,
            n_tiles, LEVELS=levels, POOL=pool, KEEP=TILE_KEEP, HALF=HALF_KEEP, CHUNK=chunk, TOP_SINGLE=widest <= chunk,
            TOP_BITS=_next_power_of_2(widest).bit_length() - 1, FINE_SINGLE=fine <= chunk,
            FINE_BITS=fine.bit_length() - 1, num_warps=8)
    return idx, inv


def _rope_args(x, cos, sin):
    """Kernel arguments for the optional rotation tables (x stands in when there are none)."""
    if cos is None:
        return x, x, 0
    return cos.contiguous(), sin.contiguous(), cos.shape[1]


def _launch_gather(x, idx, levels, pool, cos, sin):
    """Twin of ref_pyramid + ref_gather (+ ref_rope_at_span_end when cos, sin are given):
    x (B, Hx, N, D) -> the selected pyramid rows of every head (B, Hx, M, D)."""
    x = _last_dim_contiguous(x)
    B, HX, N, D = x.shape
    G, M = idx.shape[1], idx.shape[2]
    out = torch.empty(B, HX, M, D, dtype=x.dtype, device=x.device)
    with _on_device(x):
        _gather_kernel[_grid(M, ROWS, B * HX)](
            x, *x.stride()[:3], idx, *_rope_args(x, cos, sin), out, N, M, D, HX=HX, G=G, LEVELS=levels,
            POOL=pool, ROPE=cos is not None, BLOCK_M=ROWS, BLOCK_D=_next_power_of_2(D), num_warps=4)
    return out


def _launch_gather_backward(grad, inv, x_shape, seq_major, levels, pool, cos, sin):
    """The gather's adjoint, through the pooling and the rotation: grad (B, Hx, M, D) -> dx of
    shape x_shape, laid out as (B, N, Hx, D) in memory if seq_major (the model makes x that way,
    so its gradient comes back without a copy)."""
    grad = _last_dim_contiguous(grad)
    B, HX, N, D = x_shape
    dx = _like_layout(x_shape, seq_major, grad.dtype, grad.device)
    with _on_device(grad):
        _gather_backward_kernel[_grid(N, ROWS, B * HX)](
            grad, *grad.stride()[:3], inv, *_rope_args(grad, cos, sin), dx, *dx.stride()[:3], N, inv.shape[2], D,
            HX=HX, G=inv.shape[1], LEVELS=levels, POOL=pool, ROPE=cos is not None, BLOCK_T=ROWS,
            BLOCK_D=_next_power_of_2(D), num_warps=4)
    return dx


def _launch_scatter(attn, inv, seq_len, levels, pool):
    """Twin of ref_scatter: attn (B, H, M, D) -> out (B, H, N, D) with the causal shift. out is laid
    out as (B, N, H, D) in memory, so the model's transpose back to (B, N, H*D) is free."""
    attn = _last_dim_contiguous(attn)
    B, H, M, D = attn.shape
    out = _like_layout((B, H, seq_len, D), True, attn.dtype, attn.device)
    with _on_device(attn):
        _scatter_kernel[_grid(seq_len, ROWS, B * H)](
            attn, *attn.stride()[:3], inv, out, *out.stride()[:3], seq_len, inv.shape[2], D, H=H, G=inv.shape[1],
            LEVELS=levels, POOL=pool, BLOCK_T=ROWS, BLOCK_D=_next_power_of_2(D), num_warps=4)
    return out


def _launch_scatter_backward(grad, idx, levels, pool):
    """The scatter's adjoint: grad (B, H, N, D), read through its strides (the model's gradient is
    transposed) -> d attn (B, H, M, D)."""
    grad = _last_dim_contiguous(grad)
    B, H, N, D = grad.shape
    M = idx.shape[2]
    dattn = torch.empty(B, H, M, D, dtype=grad.dtype, device=grad.device)
    with _on_device(grad):
        _scatter_backward_kernel[_grid(M, ROWS, B * H)](
            grad, *grad.stride()[:3], idx, dattn, N, M, D, H=H, G=idx.shape[1], LEVELS=levels, POOL=pool,
            BLOCK_M=ROWS, BLOCK_D=_next_power_of_2(D), num_warps=4)
    return dattn


# -----------------------------------------------------------------------------
# The wrappers as torch ops, and their gradients
#
# torch.compile cannot trace a kernel launch from a Python wrapper: it would break its graph at
# every one. Registered as an op (lighthouse::gather, ...) with a "fake" version that only makes
# the output's shape, each launch becomes one node of the graph. The gradients come from
# torch.autograd.Function, which eager mode and torch.compile both understand. (This low-level
# registration costs less host time per call than @torch.library.custom_op.) In eager mode the
# layer calls the launch functions themselves (_call): there the dispatcher would only add host time.

_lib = torch.library.Library("lighthouse", "DEF")


def _register(name, schema, launch, fake):
    """The op lighthouse::name: `launch` runs it on any device, `fake` makes its outputs' shapes."""
    _lib.define(name + schema)
    _lib.impl(name, launch, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lighthouse::{name}", fake, lib=_lib)
    return getattr(torch.ops.lighthouse, name).default


def _call(op, launch, *args):
    """Run `op`, registered with `launch`: through the dispatcher while torch.compile traces, so that
    the launch is one node of its graph; in eager mode as `launch` itself, which skips the dispatch
    (a few us of host time per op; a fwd+bwd call of the layer runs ten)."""
    return op(*args) if torch.compiler.is_compiling() else launch(*args)


triton_norm_scores = _register(
    "norm_scores", "(Tensor q, Tensor k, int levels, int pool) -> (Tensor, Tensor)", _launch_norm_scores,
    lambda q, k, levels, pool: (_score_pyramid_like(q, k, levels, pool), _score_pyramid_like(q, k, levels, pool)))
triton_select = _register(
    "select",
    "(Tensor q_score_pyr, Tensor k_score_pyr, int seq_len, int levels, int pool, int topk) -> (Tensor, Tensor)",
    _launch_select,
    lambda q_pyr, k_pyr, seq_len, levels, pool, topk: (
        q_pyr.new_empty(*q_pyr.shape[:2], gathered_length(seq_len, levels, pool, topk), dtype=torch.int64),
        q_pyr.new_empty(q_pyr.shape, dtype=torch.int64)))
_gather_op = _register(
    "gather", "(Tensor x, Tensor idx, int levels, int pool, Tensor? cos, Tensor? sin) -> Tensor", _launch_gather,
    lambda x, idx, levels, pool, cos, sin: x.new_empty(*x.shape[:2], idx.shape[2], x.shape[3]))
_gather_backward_op = _register(
    "gather_backward", "(Tensor grad, Tensor inv, int[] x_shape, bool seq_major, int levels, int pool, Tensor? cos, "
    "Tensor? sin) -> Tensor", _launch_gather_backward,
    lambda grad, inv, x_shape, seq_major, *_: _like_layout(x_shape, seq_major, grad.dtype, grad.device))
_scatter_op = _register(
    "scatter", "(Tensor attn, Tensor inv, int seq_len, int levels, int pool) -> Tensor", _launch_scatter,
    lambda attn, inv, seq_len, levels, pool: _like_layout(
        (attn.shape[0], attn.shape[1], seq_len, attn.shape[3]), True, attn.dtype, attn.device))
_dilated_scores_op = _register(
    "dilated_scores", "(Tensor q, Tensor k, Tensor v, int dilation, str kernel) -> (Tensor, Tensor)",
    _launch_dilated_scores,
    lambda q, k, v, dilation, kernel: tuple(
        q.new_empty(q.shape[0], k.shape[1], q.shape[2], dtype=torch.float32) for _ in range(2)))
_scatter_backward_op = _register(
    "scatter_backward", "(Tensor grad, Tensor idx, int levels, int pool) -> Tensor", _launch_scatter_backward,
    lambda grad, idx, levels, pool: grad.new_empty(*grad.shape[:2], idx.shape[2], grad.shape[3]))


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, inv, levels, pool, cos, sin):
        ctx.save_for_backward(inv, cos, sin)
        ctx.x_shape, ctx.seq_major = list(x.shape), x.stride(2) > x.stride(1)
        ctx.levels, ctx.pool = levels, pool
        return _call(_gather_op, _launch_gather, x, idx, levels, pool, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        inv, cos, sin = ctx.saved_tensors
        dx = _call(_gather_backward_op, _launch_gather_backward, grad, inv, ctx.x_shape, ctx.seq_major, ctx.levels,
                   ctx.pool, cos, sin)
        return dx, None, None, None, None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, idx, inv, seq_len, levels, pool):
        ctx.save_for_backward(idx)
        ctx.levels, ctx.pool = levels, pool
        return _call(_scatter_op, _launch_scatter, attn, inv, seq_len, levels, pool)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        dattn = _call(_scatter_backward_op, _launch_scatter_backward, grad, idx, ctx.levels, ctx.pool)
        return dattn, None, None, None, None, None


def triton_gather(x, idx, inv, levels, pool, cos=None, sin=None):
    """Twin of ref_pyramid + ref_gather (+ ref_rope_at_span_end when cos, sin are given):
    x (B, Hx, N, D) -> the selected pyramid rows of every head (B, Hx, M, D). Differentiable in x;
    the backward differentiates through the pooling and the rotation too."""
    return _Gather.apply(x, idx, inv, levels, pool, cos, sin)


def triton_scatter(attn, idx, inv, seq_len, levels, pool):
    """Twin of ref_scatter: attn (B, H, M, D) -> out (B, H, N, D), differentiable in attn."""
    return _Scatter.apply(attn, idx, inv, seq_len, levels, pool)



def triton_dilated_scores(q, k, v, dilation, kernel=None):
    """Twin of ref_dilated_scores: (B, H_kv, N) fp32 q- and k-scores, no gradient, with the
    kernel DILATED_KERNEL names unless `kernel` is given (see DILATED_KERNEL)."""
    kernel = DILATED_KERNEL if kernel is None else kernel
    if kernel not in DILATED_KERNELS:
        raise ValueError(f"the dilated scorer's kernel must be one of {', '.join(map(repr, DILATED_KERNELS))} "
                         f"(got {kernel!r})")
    N = q.shape[2]
    if not isinstance(dilation, int) or dilation < 1 or N % dilation:
        raise ValueError(f"the dilated scorer needs a dilation >= 1 that divides the sequence length {N} "
                         f"(got {dilation!r})")
    if kernel == "sdpa":
        return sdpa_dilated_scores(q, k, v, dilation)
    return _call(_dilated_scores_op, _launch_dilated_scores, q, k, v, dilation, kernel)


def triton_score_pyramids(q, k, v, levels, pool, scorer="norm", dilation=4):
    """Twin of ref_token_scores + ref_score_pyramid: (B, H_kv, P) q- and k-score pyramids, fp32,
    no gradient."""
    q, k, v = q.detach(), k.detach(), v.detach()
    if scorer == "dilated":
        return tuple(ref_score_pyramid(s, levels, pool) for s in triton_dilated_scores(q, k, v, dilation))
    return _call(triton_norm_scores, _launch_norm_scores, q, k, levels, pool)


def lighthouse_triton(q, k, v, levels, pool, topk, scorer="norm", dilation=4, rope=None, selection="paper"):
    """The whole layer with Triton kernels around torch SDPA. Same contract as lighthouse_reference."""
    _check_qkv(q, k, v, levels, pool, topk, scorer, dilation, rope, selection)
    B, H, N, D = q.shape
    G = k.shape[1]
    if B * H > MAX_GRID_HEADS:
        raise ValueError(f"batch * n_head = {B * H} is more than the {MAX_GRID_HEADS} programs a GPU grid allows "
                         f"on its second axis; use at most {MAX_GRID_HEADS // H} sequences per call")
    q_score, k_score = triton_score_pyramids(q, k, v, levels, pool, scorer, dilation)  # (B, G, P) each
    if selection == "causal":  # no kernel of its own: whole-tensor torch operations (topk, cumsum, sort)
        idx = ref_select_causal(q_score, k_score, N, levels, pool, topk)  # (B, G, M)
        inv = inverse_map(idx, q_score.shape[2])  # (B, G, P)
    else:
        idx, inv = _call(triton_select, _launch_select, q_score, k_score, N, levels, pool, topk)  # (B, G, M), (B, G, P)
    cos, sin = rope if rope is not None else (None, None)
    q_sel = triton_gather(q, idx, inv, levels, pool, cos, sin)  # (B, H, M, D)
    k_sel = triton_gather(k, idx, inv, levels, pool, cos, sin)  # (B, G, M, D)
    v_sel = triton_gather(v, idx, inv, levels, pool, None, None)
    # SDPA's own grouped-query attention: k and v stay at G heads, not copied to all H
    attn = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True, enable_gqa=G != H)  # (B, H, M, D)
    return triton_scatter(attn, idx, inv, N, levels, pool)


# -----------------------------------------------------------------------------
# Public entry points


def _pick_impl(impl, tensor):
    if impl is None:
        return "triton" if tensor.is_cuda else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'torch', 'triton' or None (got {impl!r})")
    return impl


def lighthouse_attention(q, k, v, levels, pool, topk, impl=None, scorer="norm", dilation=4, rope=None,
                         selection="paper"):
    """Lighthouse attention. q (B, H, N, D), k, v (B, H_kv, N, D) -> (B, H, N, D).

    impl: "torch" (the reference), "triton", or None for Triton on CUDA and the reference on CPU.
    scorer: "norm" (the paper's main text) or "dilated" (with `dilation` interleaved phases).
    rope: None if q and k arrive rotated by RoPE (the paper), or the tables (cos, sin), each
    (>= N, D/2) in the pair convention of rope_rotate, if q and k arrive raw: then each selected
    entry is rotated at the last token of its span.
    selection: "paper" (ref_select: reads ahead up to the end of a tile) or "causal"
    (ref_select_causal: each entry's selection depends only on tokens up to its end).
    """
    if _pick_impl(impl, q) == "triton":
        return lighthouse_triton(q, k, v, levels, pool, topk, scorer, dilation, rope, selection)
    return lighthouse_reference(q, k, v, levels, pool, topk, scorer, dilation, rope, selection)


def lighthouse_select(q_scores, k_scores, levels, pool, topk, impl=None, selection="paper"):
    """The selection on its own: per-token scores (B, H_kv, N) (any finite or infinite floats)
    -> the selected entries in causal order as int64 indices (B, H_kv, M) into the concatenated
    pyramid layout (with selection="causal", unused slots at the end hold -1)."""
    N = q_scores.shape[-1]
    check_lighthouse_config(N, levels, pool, topk, selection=selection)
    if q_scores.shape != k_scores.shape or q_scores.dim() != 3:
        raise ValueError(f"q_scores and k_scores must both be (B, H_kv, N); got {tuple(q_scores.shape)} "
                         f"and {tuple(k_scores.shape)}")
    if torch.isnan(q_scores).any() or torch.isnan(k_scores).any():
        raise ValueError("scores contain NaN, which has no place in an order: fix the scores first")
    q_pyr = ref_score_pyramid(q_scores.float(), levels, pool)  # (B, G, P): max-pools, exact
    k_pyr = ref_score_pyramid(k_scores.float(), levels, pool)
    if selection == "causal":  # one implementation for both paths
        return ref_select_causal(q_pyr, k_pyr, N, levels, pool, topk)
    if _pick_impl(impl, q_scores) == "triton":
        return triton_select(q_pyr, k_pyr, N, levels, pool, topk)[0]
    return ref_select(q_pyr, k_pyr, N, levels, pool, topk)
