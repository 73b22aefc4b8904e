# The paper's model shape (Peng, Ghosh, Quesnelle 2026): d=1024, 30 layers, 8 x 128-dim heads,
# SwiGLU 1536, 98304-byte context, L=3, p=4, topk=1536 (attention on 18432 entries), layers
# 0, 1, 28, 29 dense; 10k Lighthouse + 6k recovery steps, global batch 32 sequences (3.1M tokens).
# Hardware: a multi-GPU node, e.g. torchrun --standalone --nproc_per_node=8 train.py config/paper_98k.py
# (gradient_accumulation_steps is the global count and is split across the GPUs).
# Activation checkpointing keeps attention's outputs (checkpoint_keep_attention, in both phases, so the
# two arms are like for like): faster steps for more memory. Measured steps only, not a run: on one
# H200, compiled, one sequence per step, with this config's settings a dense step takes 4.08 s at
# 23.2 GiB peak and a Lighthouse step 1.06 s at 19.2 GiB (bench.py --mode=train, 2026-11-30); with
# plain checkpointing (--checkpoint_keep_attention=False) 5.06 s (19.4k tok/s, 18.4 GiB) and 1.23 s
# (79.6k tok/s, 18.1 GiB). See docs/benchmarks.md. At this config's rates, and if 8 GPUs scaled
# perfectly (an estimate), the 16k steps would take about 39 hours on 8 H200s. The paper reports a
# final loss of 0.698 (dense from scratch: 0.724).
out_dir = "out-paper-98k"
dataset = "books_bytes"
block_size = 98304
batch_size = 1
gradient_accumulation_steps = 32
n_layer = 30
n_head = 8
n_kv_head = 8
n_embd = 1024
ffn_hidden = 1536
rope_theta = 500000.0
dense_layers = [0, 1, -2, -1]
activation_checkpointing = True
checkpoint_keep_attention = True
lighthouse_iters = 10000
recovery_iters = 6000
lh_levels = 3
lh_pool = 4
lh_topk = 1536
learning_rate = 2e-3
lr_schedule = "constant"
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 500
eval_iters = 20
log_interval = 10
ckpt_interval = 250
sample_at_end = False
