# The first run: a tiny byte-level model on the default Shakespeare corpus, CPU only.
# Both phases: 240 Lighthouse iterations (L=2, p=4, topk=128: attention over 768 of the 1024
# positions, the last layer dense), then 120 dense recovery iterations.
# Measured on 2 CPU cores (fresh clone, data prepared on the way): 207 s in all, 179 s of training
# (Lighthouse phase 8.1k tok/s, dense phase 8.6k tok/s: at 1024 tokens there is nothing to save),
# final dense val loss 2.007. At the switch the dense val loss is 2.27 against 2.06 in Lighthouse mode.
out_dir = "out-quick-cpu"
dataset = "shakespeare_bytes"  # prepared automatically on first use
device = "cpu"
block_size = 1024
batch_size = 4
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
ffn_hidden = 384
lighthouse_iters = 240
recovery_iters = 120
lh_levels = 2
lh_pool = 4
lh_topk = 128
dense_layers = [-1]
learning_rate = 3e-3
warmup_iters = 30
eval_interval = 60
eval_iters = 8
log_interval = 20
ckpt_interval = 60
