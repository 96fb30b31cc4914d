import os

# MKL picks matrix-product kernels by memory alignment, so two processes can differ by an ulp in a
# forward (seen: 3 of 20 forked runs of tests/scripts/kill_during_commit.py); its conditional
# bitwise reproducibility makes trajectories compared across processes exact (set before MKL loads).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import torch  # noqa: E402

# Without a GPU, the Triton kernels run in Triton's CPU interpreter (must be set before import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
