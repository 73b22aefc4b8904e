"""
Context parallelism (CP): one sequence shared by W GPUs, in both phases, computing what one GPU
computes.

The layout is torch's load-balanced one: a sequence of N tokens is cut into 2W chunks of
n = N / (2W), and rank r holds chunks r and 2W-1-r, side by side. Under causal attention an early
chunk has little to attend to and a late one much, so pairing them gives every rank the same work.

Dense layers: torch's own context parallelism (`context_parallel`, below in `sequence_sharded`)
turns every causal F.scaled_dot_product_attention on the ranks' shares into ring attention.

Lighthouse layers (the norm scorer): with a chunk of n tokens and a budget of topk / (2W), a
chunk's tiles are exactly one GPU's tiles, provided the chunk boundaries fall on tile boundaries
(`check_shardable`). Each tile's selection depends only on the tile, and every entry of chunk c
sorts before every entry of chunk c+1, so each rank runs steps 1-5 of the layer on each of its two
chunks on its own, and the gathered entries of its chunks r and 2W-1-r, side by side, are the
load-balanced layout of one GPU's gathered sequence. Causal SDPA on them under torch's context is
ring attention over that sequence. The scatter is local too, except for one thing: with the causal
shift, the last entry of each level lvl >= 1 of chunk c feeds the first p^lvl - 1 tokens of chunk
c+1, which may sit on another rank. Those (L-1) rows per chunk (the "carry") are all-gathered.
The result equals one GPU's layer up to the order of floating-point sums in the attention.

Not supported under CP (refused before any work): the dilated scorer (its strided attention
spans the whole sequence) and the causal selection (each tile takes its thresholds from the tile
before, which for a chunk's first tile lies in another chunk).

torch APIs relied on, present in torch 2.11 and 2.13: torch.distributed.device_mesh.init_device_mesh,
torch.distributed.tensor.experimental.context_parallel(mesh, buffers=, buffer_seq_dims=,
no_restore_buffers=) with its default load-balanced (head-tail) layout, torch.distributed's
all_gather and all_reduce.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lighthouse_kernel as lk

# -----------------------------------------------------------------------------
# The layout


def chunk_ids(rank, world):
    """The two chunks (of 2 * world) that rank holds, in the order it holds them."""
    return rank, 2 * world - 1 - rank


def positions(rank, world, seq_len, device=None):
    """(seq_len / world,) the global positions of rank's tokens, in the order it holds them."""
    n = seq_len // (2 * world)  # tokens per chunk
    return torch.cat([torch.arange(c * n, (c + 1) * n, device=device) for c in chunk_ids(rank, world)])


def shard(x, rank, world, dim):
    """Rank's share of x along dim (a whole sequence)."""
    return x.index_select(dim, positions(rank, world, x.shape[dim], x.device))


def unshard(shares, world, dim):
    """The inverse of shard: shares (world, ...) stacked in rank order -> the whole sequence."""
    joined = torch.cat(list(shares.unbind(0)), dim=dim)  # the ranks' shares one after another
    seq_len = joined.shape[dim]
    order = torch.cat([positions(r, world, seq_len, joined.device) for r in range(world)])
    return joined.index_select(dim, order.argsort())  # position p comes from where it sits in `joined`


# -----------------------------------------------------------------------------
# What can be sharded, checked before any work


def check_shardable(seq_len, levels, pool, topk, world):
    """Raise ValueError, naming values that would work, unless a Lighthouse layer over seq_len tokens
    can be cut into 2 * world chunks on tile boundaries: topk / 128 tiles, a multiple of 2 * world,
    that cut the seq_len / pool^(levels-1) coarsest entries into equal parts."""
    chunks, span, n_tiles = 2 * world, pool ** (levels - 1), topk // lk.TILE_KEEP
    if n_tiles % chunks == 0 and seq_len % (span * n_tiles) == 0:
        return
    n_top = seq_len // span
    step = lk.TILE_KEEP * chunks  # topk must be a multiple of this
    # topks that work at this block_size: tiles that divide the coarsest entries, >= 128 entries each
    topks = [t for t in range(step, n_top + 1, step) if n_top % (t // lk.TILE_KEEP) == 0]
    nearest = {max([t for t in topks if t <= topk], default=None), min([t for t in topks if t >= topk], default=None)}
    fixes = [f"lh_topk={t}" for t in sorted(nearest - {None})]
    if n_tiles % chunks == 0:  # this topk works at a block_size that is a multiple of span * n_tiles
        unit = span * n_tiles
        lower = seq_len // unit * unit
        fixes += [f"block_size={b}" for b in (lower, lower + unit) if b >= span * topk]
    raise ValueError(f"a Lighthouse layer cannot be cut into 2*context_parallel = {chunks} chunks on tile boundaries "
                     f"at block_size={seq_len}, lh_topk={topk}, lh_levels={levels}, lh_pool={pool}: its "
                     f"{n_tiles} tiles must be a multiple of {chunks} and cut the {seq_len}/{span} coarsest entries "
                     f"into equal parts; would work: {' or '.join(fixes) if fixes else 'a smaller context_parallel'}")


def check_context_parallel(cp, world_size, on_gpu, block_size, lighthouse, levels, pool, topk, scorer, selection):
    """Raise ValueError, saying what to change, unless training can share each sequence across cp
    processes (lighthouse: whether a Lighthouse phase runs)."""
    if cp == 1:
        return
    if world_size % cp:
        raise ValueError(f"context_parallel={cp} needs a multiple of {cp} processes, got {world_size}: run under "
                         f"torchrun --nproc_per_node={cp} (or a multiple), or set context_parallel to a divisor of "
                         f"{world_size}")
    if not on_gpu:
        raise ValueError("context_parallel > 1 needs CUDA GPUs (torch's ring attention runs GPU kernels only); "
                         "use context_parallel=1 on a CPU")
    if block_size % (2 * cp):
        lower = block_size // (2 * cp) * 2 * cp
        raise ValueError(f"block_size={block_size} must be a multiple of 2*context_parallel = {2 * cp} (each "
                         f"sequence is cut into {2 * cp} chunks); would work: block_size={lower} or {lower + 2 * cp}")
    if not lighthouse:
        return
    if scorer != "norm":
        raise ValueError(f"lh_scorer={scorer!r} cannot run under context_parallel: its strided attention spans the "
                         f"whole sequence, across ranks; use lh_scorer='norm' or context_parallel=1")
    if selection != "paper":
        raise ValueError(f"lh_selection={selection!r} cannot run under context_parallel: each tile takes its "
                         f"thresholds from the tile before, which for a chunk's first tile lies in another rank's "
                         f"chunk; use lh_selection='paper' or context_parallel=1")
    check_shardable(block_size, levels, pool, topk, cp)


# -----------------------------------------------------------------------------
# The Lighthouse layer on a rank's share


def select_and_gather(q, k, v, levels, pool, topk, rope=None, impl=None):
    """Steps 1-5 of the layer on one chunk, as if it were a whole sequence (lighthouse_kernel's
    steps; impl: "triton", "torch" (the reference), or None: Triton on a GPU, the reference on
    the CPU). q (B, H, n, D), k, v (B, G, n, D) -> the gathered q, k, v (B, H or G, M_chunk, D)
    and the selection (idx, inv) the scatter needs. rope: None, or the (cos, sin) tables at the
    chunk's own tokens, (n, D/2), which places each entry at its global position."""
    n = q.shape[2]
    cos, sin = rope if rope is not None else (None, None)
    if (impl or ("triton" if q.is_cuda else "torch")) == "triton":
        q_score, k_score = lk.triton_score_pyramids(q, k, v, levels, pool)  # (B, G, P) each
        idx, inv = lk.triton_select(q_score, k_score, n, levels, pool, topk)  # (B, G, M_chunk), (B, G, P)
        # (B, H or G, M_chunk, D) each
        q_sel, k_sel = (lk.triton_gather(x, idx, inv, levels, pool, cos, sin) for x in (q, k))
        return q_sel, k_sel, lk.triton_gather(v, idx, inv, levels, pool), idx, inv
    with torch.no_grad():
        q_score, k_score = (lk.ref_score_pyramid(s, levels, pool) for s in lk.ref_token_scores(q, k, v))
        idx = lk.ref_select(q_score, k_score, n, levels, pool, topk)
        inv = lk.inverse_map(idx, q_score.shape[2])
    q_sel, k_sel, v_sel = (lk.ref_gather(lk.ref_pyramid(x, levels, pool), idx) for x in (q, k, v))
    if rope is not None:
        q_sel, k_sel = (lk.ref_rope_at_span_end(x, idx, cos, sin, n, levels, pool) for x in (q_sel, k_sel))
    return q_sel, k_sel, v_sel, idx, inv


def scatter(attn, idx, inv, n, levels, pool, impl=None):
    """Step 6 on one chunk of n tokens: attn (B, H, M_chunk, D) -> (B, H, n, D) (impl: as above)."""
    if (impl or ("triton" if attn.is_cuda else "torch")) == "triton":
        return lk.triton_scatter(attn, idx, inv, n, levels, pool)
    return lk.ref_scatter(attn, inv, n, levels, pool)


def carry(attn, inv, n, levels, pool):
    """What a chunk of n tokens sends into the next chunk: per level lvl >= 1 the output of its last
    entry (zeros if not selected), which feeds the next chunk's first p^lvl - 1 tokens.
    attn (B, H, M_chunk, D), inv (B, G, P) -> (B, H, L-1, D)."""
    B, H, _, D = attn.shape
    offsets, _ = lk.level_offsets(n, levels, pool)
    last = [offsets[lvl] + n // pool**lvl - 1 for lvl in range(1, levels)]  # pyramid indices of the last entries
    # (slices, not an index tensor: a tensor made from a list is a host-to-device copy, which waits for the GPU)
    pos = torch.cat([inv[:, :, e:e + 1] for e in last], dim=2)  # (B, G, L-1): their places in attn, or -1
    pos = pos.repeat_interleave(H // inv.shape[1], dim=1)  # (B, H, L-1)
    rows = attn.gather(2, pos.clamp(min=0)[..., None].expand(-1, -1, -1, D))  # (B, H, L-1, D)
    return rows * (pos >= 0)[..., None]


def head_with_carry(out, received, levels, pool):
    """The first p^(L-1) - 1 outputs of a chunk, out (B, H, n, D), plus the carry (B, H, L-1, D) of
    the chunk before it: level lvl's row goes to the chunk's first p^lvl - 1 tokens; the rest of
    the chunk is unchanged. -> (B, H, p^(L-1) - 1, D). (Not in place: the Triton scatter's output
    is a view made inside an autograd Function, which autograd does not allow to be modified.)"""
    reach = pool ** (levels - 1) - 1  # the tokens the coarsest level's carry reaches, the most of any
    u = torch.arange(reach, device=out.device)
    reaches = torch.stack([u < pool**lvl - 1 for lvl in range(1, levels)])  # (L-1, reach): level lvl's reaches u
    return out[:, :, :reach] + reaches.t().to(received.dtype) @ received  # + (reach, L-1) @ (B, H, L-1, D)


def received_carries(carries, rank, world):
    """carries (world, 2, ...): every rank's two chunks' carries, in rank order -> (2, ...): what the
    chunk before each of rank's chunks sends (zeros before chunk 0)."""
    by_chunk = torch.cat([carries[:, 0], carries[:, 1].flip(0)])  # (2W, ...) in chunk order (rank r's second is 2W-1-r)
    from_before = torch.cat([torch.zeros_like(by_chunk[:1]), by_chunk[:-1]])  # entry c: chunk c-1's carry
    return torch.stack([from_before[c] for c in chunk_ids(rank, world)])


class _AllGather(torch.autograd.Function):
    """x from every rank of the group, stacked in rank order (world, *x.shape). Backward: every
    rank's gradient for this rank's x, summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather(x, group):
    return _AllGather.apply(x, group)


def lighthouse_cp(q, k, v, shard, levels, pool, topk, rope=None, impl=None):
    """The Lighthouse layer (norm scorer, the paper's selection) on rank shard.rank's share of the
    sequence: q (B, H, 2n, D), k, v (B, G, 2n, D), chunks shard.rank and 2W-1-shard.rank side by
    side -> (B, H, 2n, D), this rank's share of one GPU's output. rope: None, or the (cos, sin)
    tables at this rank's tokens, (2n, D/2); impl: as for select_and_gather. Call it under
    `sequence_sharded`, which makes the SDPA below ring attention."""
    H, n2, G = q.shape[1], q.shape[2], k.shape[1]
    n = n2 // 2  # tokens per chunk
    lk.check_lighthouse_config(n2 * shard.world, levels, pool, topk, H, G)
    check_shardable(n2 * shard.world, levels, pool, topk, shard.world)
    chunks = []
    for i, qkv in enumerate(zip(q.chunk(2, dim=2), k.chunk(2, dim=2), v.chunk(2, dim=2))):
        chunk_rope = None if rope is None else tuple(t[i * n:(i + 1) * n] for t in rope)  # (n, D/2) each
        chunks.append(select_and_gather(*qkv, levels, pool, topk // (2 * shard.world), chunk_rope, impl))
    # the two chunks' entries side by side: (B, H or G, M_chunk, D) x 2 -> (B, H or G, 2 M_chunk, D)
    q_sel, k_sel, v_sel = (torch.cat([chunk[j] for chunk in chunks], dim=2) for j in range(3))
    if G != H:  # all query heads get their kv head's entries: ring attention takes no grouped heads
        k_sel, v_sel = (x.repeat_interleave(H // G, dim=1) for x in (k_sel, v_sel))
    attn = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True)  # (B, H, 2 M_chunk, D)
    outs, carries = [], []
    for (_, _, _, idx, inv), a in zip(chunks, attn.chunk(2, dim=2)):
        outs.append(scatter(a, idx, inv, n, levels, pool, impl))  # (B, H, n, D)
        carries.append(carry(a, inv, n, levels, pool))  # (B, H, L-1, D)
    gathered = all_gather(torch.stack(carries), shard.group)  # (W, 2, B, H, L-1, D)
    reach = pool ** (levels - 1) - 1  # the tokens a carry reaches
    pieces = []
    for out, received in zip(outs, received_carries(gathered, shard.rank, shard.world)):
        pieces += [head_with_carry(out, received, levels, pool), out[:, :, reach:]]
    # joined along the tokens as (B, tokens, H, D) views, where the Triton scatter's outputs are
    # contiguous, so that the model's transpose back to (B, 2n, H * D) is free: -> (B, H, 2n, D)
    return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1).transpose(1, 2)


def ring_attention(q, k, v):
    """Causal attention of a dense layer on this rank's share: q (B, H, 2n, D), k, v (B, G, 2n, D).
    Under `sequence_sharded`, torch's ring attention over the whole sequence."""
    if k.shape[1] != q.shape[1]:  # all query heads get their kv head: ring attention takes no grouped heads
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# -----------------------------------------------------------------------------
# The runtime: the process grid, and one sharded micro-step


@dataclass
class Shard:
    """This process's place in its context-parallel group."""

    rank: int  # its rank in the group: it holds chunks rank and 2W-1-rank
    world: int  # the group's size W
    group: object  # the group's process group

    def positions(self, seq_len, device):
        return positions(self.rank, self.world, seq_len, device)


def make_mesh(context_parallel, device_type):
    """The (data-parallel x context-parallel) grid of all processes: processes d*cp .. d*cp+cp-1
    share sequences. Returns this process's context-parallel group, as a 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device_type, (world // context_parallel, context_parallel), mesh_dim_names=("dp", "cp"))
    return mesh["cp"]


@contextmanager
def sequence_sharded(model, mesh, x, y):
    """Around one micro-step's forward *and* backward (the ring's backward runs through the same
    machinery). Inside, x and y (B, N) hold this process's share of each sequence (torch cuts them
    in place), F.scaled_dot_product_attention is ring attention, and the model knows its shard.
    mesh: the context-parallel group from make_mesh, or None (no CP: nothing changes)."""
    if mesh is None:
        yield
        return
    from torch.distributed.tensor.experimental import context_parallel

    with context_parallel(mesh, buffers=[x, y], buffer_seq_dims=[1, 1], no_restore_buffers={x, y}):
        model.set_shard(Shard(mesh.get_local_rank(), mesh.size(), mesh.get_group()))
        try:
            yield
        finally:
            model.set_shard(None)
