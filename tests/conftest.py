import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import): without a CUDA GPU, run the Triton
# kernels in its CPU interpreter. Must stay above anything that imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
