# The experiment's recipe: whole books at 64K byte-level context on one GPU (measured on H200s), every
# arm sharing seeds, data order and schedule. Model as config/books_64k.py: d=512, 8 layers, 4 x 128-dim
# heads, SwiGLU 1536 (27.4M parameters without the embedding); layers 0 and 7 stay dense in phase 1.
# 1500 steps of one 65536-token window (98M tokens): 300 dense steps on 16 windows of 4096 (a
# context-length warmup), then 750 Lighthouse + 450 recovery steps at 64K (the paper's 62.5/37.5);
# lr 1e-3, 100 warmup steps, cosine to 1e-4 at the last step.
# Data: python prepare_data.py --input 'books/train-*.txt.xz' --val_input books/val-000.txt.xz --out_dir data/books_bytes
# Measured on one H200 each (torch 2.11, compiled; assets/experiment_64k/): the dense baseline
# (--lighthouse_iters=0 --recovery_iters=1200) ends at val 1.249 +- 0.009 (3 seeds) after ~6 minutes of
# training; this Lighthouse run (norm scorer) at 1.442 (1 seed) after ~4.5 minutes; with
# --lh_selection=causal at 1.378 +- 0.008 (3 seeds). Phase rates: warmup ~900k, Lighthouse 605k, dense 255k tok/s.
out_dir = "out-experiment-64k"
dataset = "books_bytes"
block_size = 65536
batch_size = 1
gradient_accumulation_steps = 1
n_layer = 8
n_head = 4
n_kv_head = 4
n_embd = 512
ffn_hidden = 1536
rope_theta = 500000.0
dense_layers = [0, -1]
short_context_iters = 300
short_block_size = 4096
lighthouse_iters = 750
recovery_iters = 450
lh_levels = 3
lh_pool = 4
lh_topk = 2048
learning_rate = 1e-3
lr_schedule = "cosine"
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 150
eval_iters = 10
log_interval = 50
ckpt_interval = 150
sample_at_end = False
