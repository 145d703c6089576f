"""How a CUDA device computes, set once per process and stated rather than inherited from PyTorch's defaults.

    configure(args.device, autotune=True)     # after the device is chosen, before the model is built
    with fixed_algorithms(args.device):       # extraction and evaluation: the same algorithms every epoch
        feats = extract_features(...)
"""
from contextlib import contextmanager

import torch


def configure(device, autotune=False):
    """TF32 for convolutions, IEEE float32 for matrix products, and with `autotune` cuDNN's autotuner (CUDA only).

    - Convolutions may use TF32 tensor cores (a 10-bit mantissa at several times float32's rate on Ampere and later
      GPUs): the backbone is trained with noise far larger than that rounding, so --amp off trains it in TF32.
    - Matrix products stay IEEE float32: the memories' logits, the clustering's kNN and the label transfer decide
      labels by ranks, ties and thresholds, which 10 bits of mantissa would move.
    - cudnn.benchmark (train.py): every training batch of an epoch has the same shapes, so each convolution is
      timed once and its fastest algorithm kept.
    --amp bf16 / fp16 runs the backbone in that type either way.
    """
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = autotune


@contextmanager
def fixed_algorithms(device):
    """cuDNN's autotuner off for the duration: feature extraction and evaluation then use the same convolution
    algorithms in every epoch and run (the autotuner may pick another one each time it times a shape, and the
    last, shorter batch of an extraction is a shape of its own), so their features do not depend on timing."""
    if torch.device(device).type != "cuda":
        yield
        return
    before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
