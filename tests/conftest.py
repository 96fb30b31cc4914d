import os

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter (must be set before import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
