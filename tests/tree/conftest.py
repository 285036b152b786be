import os

import torch

# Triton kernels (ours, and vLLM's rejection kernel used as a reference) run in the interpreter on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
