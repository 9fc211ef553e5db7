"""Shared test setup: one torch thread per process (2-core machines oversubscribe otherwise)."""

import torch

torch.set_num_threads(1)
