# The first run: a tiny byte-level model on the default Shakespeare corpus, CPU only.
# Both phases: 240 Lighthouse iterations (L=2, p=4, topk=128: attention over 768 of the 1024
# positions, the last layer dense), then 120 dense recovery iterations. A log line every 20
# iterations, a validation every 60.
# Measured on a 2-core Intel Xeon virtual machine (lscpu: family 6, model 207; fresh clone, data
# prepared on the way, otherwise idle): 97 s of training (about 15k tok/s in both phases: at 1024 tokens
# Lighthouse saves nothing), final dense val loss 1.9864; at the switch the dense val loss is 2.2961,
# 1.9884 in Lighthouse mode. The losses are the same on every run of that machine; other CPUs differ in
# the second decimal (a 2-core AMD EPYC: 2.0068 at the end).
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
