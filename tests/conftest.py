"""Shared test settings: one intra-op thread.

The models in the tests are tiny; with two or more threads PyTorch spends most of its time
synchronising them, and on a loaded 2-core machine a test can run five times slower.
"""

import torch

torch.set_num_threads(1)
