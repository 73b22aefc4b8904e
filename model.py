"""
A Llama-style GPT whose attention layers run either dense causal SDPA or Lighthouse attention.

Token embedding -> n_layer x [RMSNorm -> attention (RoPE, GQA) -> RMSNorm -> SwiGLU MLP] -> RMSNorm
-> logits. No biases. model.set_attention("lighthouse" | "dense") switches every layer that is
not listed in `dense_layers`; the parameters, and so the state dict, are the same in both modes.
With lh_rope="span_end" a Lighthouse layer gets q and k before RoPE (and the RoPE tables), and
rotates each selected entry itself; dense layers always apply RoPE here.

    model, ckpt = GPT.from_checkpoint("out/ckpt.pt")   # a trained model, dense attention, eval mode
"""

import math
import os
import pickle
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from context_parallel import lighthouse_cp, ring_attention
from lighthouse_kernel import check_lighthouse_config, gathered_length, lighthouse_attention, rope_rotate


def setting(default, meaning):
    """A GPTConfig field: its default, and what it means (train.py --help prints it)."""
    if isinstance(default, list):  # a mutable default: every GPTConfig gets its own copy
        return field(default_factory=lambda: list(default), metadata=dict(meaning=meaning))
    return field(default=default, metadata=dict(meaning=meaning))


@dataclass
class GPTConfig:
    """Every model setting, with its default and meaning. train.py's model keys are exactly these
    fields (less vocab_size, which comes from the data), so a setting cannot exist in one place and
    not the other. The defaults are a tiny byte-level model that trains on a CPU in minutes
    (config/quick_cpu.py)."""

    block_size: int = setting(1024, "training context length (the RoPE tables cover this many positions)")
    vocab_size: int = setting(257, "from the data's meta.json (bytes: 0..255 and an end-of-document token)")
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "query heads per attention layer")
    n_kv_head: int = setting(2, "key/value heads (fewer than n_head: grouped-query attention; must divide n_head)")
    n_embd: int = setting(128, "width of the residual stream (n_embd / n_head is the head dim, even for RoPE)")
    ffn_hidden: int = setting(384, "SwiGLU hidden width")
    rope_theta: float = setting(10000.0, "RoPE base (larger: slower rotations, longer wavelengths)")
    tie_weights: bool = setting(False, "share the token embedding with the output layer")
    dense_layers: list = setting([-1], "layers that stay dense in the Lighthouse phase (negative: from the end)")
    lh_levels: int = setting(2, "Lighthouse pyramid levels L (>= 2)")
    lh_pool: int = setting(4, "Lighthouse pooling factor p (a power of two)")
    lh_topk: int = setting(128, "Lighthouse selection budget K (a multiple of 128)")
    lh_scorer: str = setting("norm", "'norm' (max token norms) or 'dilated' (norms of strided attention outputs)")
    lh_dilation: int = setting(4, "the dilated scorer's stride; block_size must be a multiple of it")
    lh_rope: str = setting("before_pool", "'before_pool' (the paper) or 'span_end' (rotate each selected entry)")
    lh_selection: str = setting("paper", "'paper' (reads ahead within a tile) or 'causal' (ours: cannot read ahead)")
    activation_checkpointing: bool = setting(False, "recompute each block in backward to save memory")
    checkpoint_keep_attention: bool = setting(False, "with activation_checkpointing, keep attention's output: "
                                                     "faster, B*T*n_embd more bf16 per layer")

    @classmethod
    def from_settings(cls, settings):
        """A GPTConfig from a dict of settings (a config file's, train.py's), ignoring other keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names})

    def check(self, lighthouse=True):
        """Raise ValueError, saying what to change, unless this model can be built (and, with
        lighthouse=True, run its Lighthouse phase)."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the head dim n_embd / n_head = {self.n_embd // self.n_head} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0 (got {self.rope_theta})")
        for i in self.dense_layers:
            if type(i) is not int or not -self.n_layer <= i < self.n_layer:  # (True is an int, but no index)
                raise ValueError(f"dense_layers entry {i!r} is not a layer index for n_layer={self.n_layer}")
        if self.checkpoint_keep_attention and not self.activation_checkpointing:
            raise ValueError("checkpoint_keep_attention=True changes what activation checkpointing recomputes: "
                             "set activation_checkpointing=True too, or leave it False")
        if lighthouse and len({i % self.n_layer for i in self.dense_layers}) == self.n_layer:  # -1 is n_layer-1
            raise ValueError(f"dense_layers={self.dense_layers} lists all {self.n_layer} layers: none is left "
                             f"to run Lighthouse attention; list fewer (or train a dense baseline: lighthouse_iters=0)")
        if lighthouse:
            try:
                check_lighthouse_config(self.block_size, self.lh_levels, self.lh_pool, self.lh_topk, self.n_head,
                                        self.n_kv_head, scorer=self.lh_scorer, dilation=self.lh_dilation,
                                        selection=self.lh_selection)
            except ValueError as e:  # its message names the layer's arguments: say which keys they are
                raise ValueError(f"the Lighthouse layer at lh_levels={self.lh_levels}, lh_pool={self.lh_pool}, "
                                 f"lh_topk={self.lh_topk}, lh_scorer={self.lh_scorer!r}, "
                                 f"lh_dilation={self.lh_dilation}, block_size={self.block_size}: {e}") from None
            if self.lh_rope not in ("before_pool", "span_end"):
                raise ValueError(f"lh_rope must be 'before_pool' or 'span_end' (got {self.lh_rope!r})")


def read_config_file(path):
    """The settings a config file makes (plain Python assignments, as in config/), as a dict.
    Names starting with '_' are private to the file. Errors name the file."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} not found")
    namespace = {}
    try:
        exec(compile(open(path).read(), path, "exec"), namespace)
    except Exception as e:  # a syntax error, or any error while running the file
        raise ValueError(f"config file {path} could not be read: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith("_")}


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with a message that says why."""


CHECKPOINT_KEYS = ("model", "model_config", "config", "meta")


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by train.py. Checkpoints hold plain data only (tensors, numbers,
    strings, lists, dicts), so they are loaded with weights_only=True: a shared file cannot run
    code. Anything else raises CheckpointError naming the file and the problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class or function: unpickling it could run code
            raise CheckpointError(f"{path} holds Python objects, not only plain data; it was not written by "
                                  f"train.py and loading it could run code, so it is refused") from None
        # any other refusal of the weights-only unpickler: bytes that are no pickle at all
        raise CheckpointError(f"{path} is damaged or not a checkpoint (not a file written by torch.save)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is damaged or not a checkpoint (truncated or empty?): {reason}") from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint written by this version of train.py "
                              f"(expected the keys {', '.join(CHECKPOINT_KEYS)})")
    # exactly GPTConfig's fields: a checkpoint of another version of model.py would build another model
    names = [f.name for f in fields(GPTConfig)]
    found = ckpt["model_config"] if isinstance(ckpt["model_config"], dict) else {}
    unknown, missing = [n for n in found if n not in names], [n for n in names if n not in found]
    if unknown or missing:
        problems = (([f"has the unknown settings {', '.join(unknown)}"] if unknown else [])
                    + ([f"lacks {', '.join(missing)}"] if missing else []))
        raise CheckpointError(f"{path} was written by another version of model.py: its model_config "
                              f"{' and '.join(problems)}; use the version of this code that wrote it")
    return ckpt


# The attention kernels SDPA may dispatch to (GPU: cuDNN, flash, memory-efficient; CPU: flash).
ATTENTION_OPS = {torch.ops.aten._scaled_dot_product_cudnn_attention.default,
                 torch.ops.aten._scaled_dot_product_flash_attention.default,
                 torch.ops.aten._scaled_dot_product_efficient_attention.default,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def keep_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing policy (checkpoint_keep_attention): keep the outputs of the attention
    kernel, recompute everything else. The backward then runs attention once instead of twice."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_all(ctx, op, *args, **kwargs):
    """Plain activation checkpointing as a selective policy: recompute every op. Compiled, the model
    checkpoints through it. torch.compile before torch 2.12 marks for recomputation only the ops it
    sees at the top of a plain checkpoint's region, not those inside a torch.autograd.Function
    (lighthouse_kernel's _Gather and _Scatter, context_parallel's): their outputs were kept
    (torch 2.11: each Lighthouse layer's gathered q, k, v and scattered output, about 0.29 GiB per
    layer at paper_98k). A policy marks every op, as torch 2.12 and later do for plain checkpoints."""
    return CheckpointPolicy.PREFER_RECOMPUTE


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim, length, theta):
    """cos and sin of position * frequency, each (length, head_dim / 2)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)  # (length, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each consecutive pair of x (B, T, heads, hd) by its position's angle; cos, sin (T, hd/2)."""
    return rope_rotate(x, cos[:, None, :], sin[:, None, :])  # the tables broadcast over the heads


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.n_embd // config.n_head
        self.wq = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.use_lighthouse = False  # set by GPT.set_attention; not a parameter or buffer
        self.shard = None  # set by GPT.set_shard: this process's share of the sequence under context parallelism

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.config
        # (B, T, heads * hd) -> (B, T, heads, hd)
        q = self.wq(x).view(B, T, c.n_head, self.head_dim)
        k = self.wk(x).view(B, T, c.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, c.n_kv_head, self.head_dim)
        span_end = self.use_lighthouse and c.lh_rope == "span_end"
        if not span_end:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (B, T, heads, hd) -> (B, heads, T, hd): views; attention reads them in this layout
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.use_lighthouse and self.shard is not None:  # chunk by chunk, then ring attention (context_parallel.py)
            y = lighthouse_cp(q, k, v, self.shard, c.lh_levels, c.lh_pool, c.lh_topk,
                              rope=(cos, sin) if span_end else None)
        elif self.use_lighthouse:
            # with span_end, raw q, k: the layer pools them and rotates each selected entry at its span's last token
            y = lighthouse_attention(q, k, v, c.lh_levels, c.lh_pool, c.lh_topk, scorer=c.lh_scorer,
                                     dilation=c.lh_dilation, rope=(cos, sin) if span_end else None,
                                     selection=c.lh_selection)
        elif self.shard is not None:
            y = ring_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_kv_head != c.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, hd) -> (B, T, H * hd)


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived, so not in the state dict
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections: smaller, as in GPT-2
            if name.endswith("wo.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.mode = "dense"
        self.shard = None

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """The model a train.py checkpoint holds, on device, in eval mode with dense attention.
        Returns (model, checkpoint): the checkpoint's "meta" names the tokenizer, "data_dir" the data."""
        ckpt = load_checkpoint(path, device)
        model = cls(GPTConfig(**ckpt["model_config"]))
        model.load_weights(ckpt, path)
        return model.to(device).eval(), ckpt

    def load_weights(self, ckpt, path):
        """The checkpoint's weights, or a CheckpointError naming path if they do not fit this model."""
        try:
            self.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # missing, unexpected or misshapen weights
            reason = " ".join(str(e).split())  # torch's message, on one line
            raise CheckpointError(f"{path}: its weights do not fit its model_config: {reason}") from None

    def model_config(self):
        """The GPTConfig as plain data, as checkpoints store it."""
        return asdict(self.config)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def lighthouse_layers(self):
        """Indices of the layers that run Lighthouse in the Lighthouse phase."""
        dense = {i % self.config.n_layer for i in self.config.dense_layers}
        return [i for i in range(self.config.n_layer) if i not in dense]

    def set_attention(self, mode):
        """'lighthouse': every layer not in dense_layers runs Lighthouse; 'dense': all dense."""
        if mode not in ("lighthouse", "dense"):
            raise ValueError(f"mode must be 'lighthouse' or 'dense', got {mode!r}")
        lighthouse = set(self.lighthouse_layers()) if mode == "lighthouse" else set()
        for i, block in enumerate(self.blocks):
            block.attn.use_lighthouse = i in lighthouse
        self.mode = mode

    def set_shard(self, shard):
        """Context parallelism (context_parallel.sequence_sharded sets it for one micro-step): idx and
        targets hold shard's share of each sequence, and attention runs across the group. None: off."""
        self.shard = shard
        for block in self.blocks:
            block.attn.shard = shard

    def forward(self, idx, targets=None):
        B, T = idx.shape
        N = T if self.shard is None else T * self.shard.world  # the whole sequence's length
        if N > self.config.block_size:
            raise ValueError(f"sequence of {N} tokens is longer than block_size {self.config.block_size}")
        if self.shard is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:  # RoPE at the global positions of this process's tokens
            pos = self.shard.positions(N, idx.device)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.embed(idx)  # (B, T, n_embd)
        for block in self.blocks:
            if not (self.config.activation_checkpointing and self.training):
                x = block(x, cos, sin)
            elif self.config.checkpoint_keep_attention or torch.compiler.is_compiling():
                # compiled plain checkpointing as a policy too: see recompute_all
                policy = keep_attention if self.config.checkpoint_keep_attention else recompute_all
                x = checkpoint(block, x, cos, sin, use_reentrant=False,
                               context_fn=partial(create_selective_checkpoint_contexts, policy))
            else:  # eager: no policy, whose dispatch mode would cost host time on every op
                # (a call of its own: torch.compile refuses the default context_fn passed explicitly)
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab), in the autocast dtype (bf16 on a GPU)
        if targets is None:
            return logits, None
        # the softmax in fp32; compiled, the cast fuses into the loss instead of a (B, T, vocab) fp32 copy
        # over all (B*T) positions; under context parallelism this share's, and every share has as many
        # tokens, so the mean over the group (train.py's gradient average) is the whole sequence's
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx (B, T), always with dense attention."""
        mode = self.mode
        self.set_attention("dense")
        try:  # the caller's mode comes back even if sampling stops (an error, a Ctrl-C)
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.block_size:]
                logits, _ = self(context)
                logits = logits[:, -1, :].float() / max(temperature, 1e-6)  # (B, vocab)
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), 1)), dim=1)
        finally:
            self.set_attention(mode)
        return idx

    def configure_optimizer(self, learning_rate, weight_decay, betas, device_type):
        """AdamW with weight decay on the matrices only; the norms' gains stay undecayed."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_weights:
            n -= self.embed.weight.numel()  # a lookup, not matrix work
        return n

    def flops_per_token(self, mode=None):
        """Training FLOPs per token (forward + backward = 3x forward) in the given attention mode.

        Matrix work: 6 per parameter. Causal attention on a sequence of S entries costs
        2 * S^2 * H * hd per forward (QK^T and AV, half of the 4 S^2 H hd by causality), spread
        over the T tokens; a Lighthouse layer attends over M gathered entries instead of T.
        """
        c = self.config
        mode = mode or self.mode
        T, hd = c.block_size, c.n_embd // c.n_head
        lighthouse = set(self.lighthouse_layers()) if mode == "lighthouse" else set()
        attention = 0
        for i in range(c.n_layer):
            S = gathered_length(T, c.lh_levels, c.lh_pool, c.lh_topk) if i in lighthouse else T
            attention += 3 * 2 * S * S * c.n_head * hd / T
        return 6 * self.num_params() + attention

    def estimate_mfu(self, tokens_per_second, peak_flops, mode=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token(mode) * tokens_per_second / peak_flops
