# Lighthouse -> dense recovery on whole books, 64K byte-level context, one 80 GB-class GPU.
# Model: d=512, 8 layers, 4 x 128-dim heads, SwiGLU 1536 (27.5M parameters); layers 0 and 7 stay
# dense in phase 1. 200 Lighthouse + 120 recovery steps of 2 x 65536 tokens (42M tokens).
# Data: python prepare_data.py --input <books folder> --tokenizer bytes   (-> data/books_bytes)
# Measured on one H200 (2 of the 5 book shards): 132 s of training (Lighthouse phase 431k tok/s,
# dense phase 222k tok/s), final dense val loss 2.10. The dense baseline with the same 320 steps
# (--lighthouse_iters=0 --recovery_iters=320) took 192 s and reached 2.03 (1.93 in a second,
# identical run: GPU runs are not bitwise reproducible). Twice as long (--lighthouse_iters=400
# --recovery_iters=240 vs --lighthouse_iters=0 --recovery_iters=640): 256 s and 1.79 vs 372 s
# and 1.63. Not run on an H100.
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
