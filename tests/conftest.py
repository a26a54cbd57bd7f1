import os
import sys

import torch

# tests/naive.py is a helper module, imported by name from the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test module
# imports kascade's kernels: without a GPU, every kernel test runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
