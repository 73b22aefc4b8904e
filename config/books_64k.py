# Lighthouse -> dense recovery on whole books, 64K byte-level context, one GPU with 16+ GB (measured on H200s).
# Model: d=512, 8 layers, 4 x 128-dim heads, SwiGLU 1536 (27.4M parameters without the embedding); layers
# 0 and 7 stay dense in phase 1. 200 Lighthouse + 120 recovery steps of 2 x 65536 tokens (42M tokens).
# Data: python prepare_data.py --input 'books/train-*.txt.xz' --val_input books/val-000.txt.xz --out_dir data/books_bytes
# Measured on H200s (torch 2.11, compiled), 3 seeds: about 2.2 minutes of training, 11.3 GB peak, final dense
# val loss 2.22 +- 0.09; the dense baseline (--lighthouse_iters=0 --recovery_iters=320) 3.3 minutes and
# 2.08 +- 0.15. Identical runs end up to 0.3 apart: compare seeds, not single runs (docs/results.md).
# Lighthouse phase 606k tok/s, dense 256k tok/s (train.py on one H200, docs/benchmarks.md).
out_dir = "out-books-64k"
dataset = "books_bytes"
block_size = 65536
batch_size = 1
gradient_accumulation_steps = 2
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
