# Lighthouse -> dense recovery on whole books, 32K byte-level context, one H100 (80 GB).
# Model: d=512, 8 layers, 4 x 128-dim heads, SwiGLU 1536 (27.5M parameters); layers 0 and 7 stay
# dense in phase 1. 200 Lighthouse + 120 recovery steps of 4 x 32768 tokens (42M tokens).
# Data: python prepare_data.py --input <books folder> --tokenizer bytes   (-> data/books_bytes)
# Not run at full length here. A 30 + 20-step run (--lighthouse_iters=30 --recovery_iters=20) on one
# H200 took 16 s at 455k tok/s (Lighthouse) and 350k tok/s (dense), dense val loss 2.57. Estimate,
# not measured: about 2.5 minutes of training for the full run on an H200.
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
