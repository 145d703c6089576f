"""The accelerator of the per-image reference pipeline (data/loader.py + data/transforms.py): the same batches,
bit for bit, from fewer operations. `train.py --input cached` (the default) uses it, `--input pil` the reference.

- cache.py: every training image decoded and resized once per run into a uint8 memory-mapped file, reused by
  every epoch, process and resume (the images' first step, Resize, is all the augmentations ever see of them);
- draws.py: each sample's augmentation parameters, drawn with the very calls of data/transforms.py from the same
  per-sample generators, so every sample gets the reference's crop, flip, jitter, rectangles and channels;
- batched.py: each augmentation step applied to a whole batch at once, on the training device;
- loader.py: CachedTrainBatches and CachedImageDataset, the counterparts of data/loader.py's datasets.
tests/test_batched.py checks each step and whole batches against the reference.
"""
import os


def use_huge_pages():
    """Back CPU tensors of 2 MB and more with transparent huge pages (Linux; PyTorch's own switch).

    A fresh batch of this pipeline, or of the feature extraction, is then faulted in 2 MB pages instead of 4 kB
    ones: 1.4-2.6x faster per core at SYSU size, while a CPU backbone at SYSU size ran about 7% slower
    (bench/bench_input.py; docs/performance.md). Where a tensor lives changes none of its values. PyTorch reads
    the variable once, at the first CPU allocation of the process, so this must run before any tensor is made;
    THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
