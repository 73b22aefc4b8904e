# Without a GPU, run the Triton kernels through Triton's CPU interpreter. This must be set before
# triton is first imported, which is why it lives here and not in the test file.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
