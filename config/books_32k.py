# Lighthouse -> dense recovery on whole books, 32K byte-level context, one GPU.
# Model: d=512, 8 layers, 4 x 128-dim heads, SwiGLU 1536 (27.4M parameters without the embedding);
# layers 0 and 7 stay dense in phase 1. 200 Lighthouse + 120 recovery steps of 4 x 32768 tokens (42M tokens).
# Data: data/books_bytes, the books set (docs/data.md), prepared as in config/books_64k.py.
# Not run: its training time, memory and final loss are not known until it is run. The only measurement
# of these settings is a 30 + 20-step run on one H200, eager, with the trainer and kernels of commit
# cd93424 (assets/runs/h200_books32k_30_20.jsonl): 455k tok/s in the Lighthouse phase, 350k tok/s dense,
# 7.9 GB peak. The trainer and kernels have changed since; how that changes these numbers is not measured.
# At 32K, topk 2048 attends over 56% of the positions: the Lighthouse layers save less than at 64K.
out_dir = "out-books-32k"
dataset = "books_bytes"
block_size = 32768
batch_size = 1
gradient_accumulation_steps = 4
n_layer = 8
n_head = 4
n_kv_head = 4
n_embd = 512
ffn_hidden = 1536
rope_theta = 500000.0
dense_layers = [0, -1]
lighthouse_iters = 200
recovery_iters = 120
lh_levels = 3
lh_pool = 4
lh_topk = 2048
learning_rate = 2e-3
lr_schedule = "constant"
warmup_iters = 40
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 40
eval_iters = 10
log_interval = 10
ckpt_interval = 100
sample_at_end = False
