"""Decode once: every training image decoded and resized to the training size a single time per run.

MULT (He et al., IJCV 2024) and MBMIL (Wang et al., AAAI 2026): every training pipeline of data/transforms.py
starts with Resize(H x W) of the decoded image, and so does the test pipeline. The uint8 result of
that Resize is all that the augmentations after it ever see, so it is computed once, here, with the very
`data.transforms.Resize` the per-image pipelines run (PIL's resize of the decoded PIL image), and stored as
channel planes, uint8 [N, 3, H, W]: 4.2 GB for SYSU-MM01's 34,167 training images at 288 x 144.

Where it lives: a `np.memmap` file in the run folder (`path`), or RAM (`path=None`, for tests and small sets).
The file is the default for a real dataset because
- it survives restarts: a resumed run reopens it instead of decoding 34k JPEGs again;
- every DataLoader worker and every process of the run reads the same pages through the OS page cache: no
  copy per worker (a 4.2 GB array in process memory would be copied into each worker as it is touched);
- the OS pages it out under memory pressure and back in on demand; a process array cannot be paged out
  without swap.

Key: `<path>.json` beside the pixels holds the format, height, width, interpolation and, per row, the source
file's (path, size, mtime_ns), then two facts about the decoded pixels the batched pipeline uses (three equal
channels; the number of 0 values per channel). Opening an existing cache checks every row against the file system:
- a missing file raises FileNotFoundError naming it (the dataset changed under the run: fix it or rebuild);
- a changed file (other size or mtime) is decoded again into its row, and `cache.summary` names it;
- a file that cannot be decoded raises ValueError naming it (every such file is tried first); a failed build
  leaves no file or folder behind;
- another height, width, interpolation, format or list of paths means another cache: it is rebuilt whole.
The key is written last, by an atomic rename, so an interrupted build is rebuilt on the next open.

Sharing: `cache_name` names a file by its image list, size and interpolation, so runs of one dataset (an ablation
series) can keep one cache in a common folder. Each build writes its own temporary file and renames it into place:
two runs building the same cache at once both decode, and either's file is the right one.
"""
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from ..common import ImageList, read_image, unusable
from ..transforms import _INTERPOLATIONS, Resize

FORMAT = "vireid-image-cache-v1"


class ImageCache:
    """uint8 images [N, 3, H, W] (CPU tensor, memory-mapped or in RAM), row i decoded from paths[i].

    grey:  bool [N], the three channels are equal (infrared images stored as RGB)
    zeros: int64 [N, 3], 0 values in each channel (data/draws.py's LinearTransform shortcut)
    height, width, interpolation: the Resize they went through; path: the .u8 file or None (RAM);
    summary: one line saying what opening or building did.
    """

    def __init__(self, images, flags, paths, height, width, interpolation, path, summary):
        self.images, self.paths, self.path, self.summary = images, paths, path, summary
        self.grey = torch.tensor([bool(f[0]) for f in flags], dtype=torch.bool)
        self.zeros = torch.tensor([f[1] for f in flags], dtype=torch.int64).view(-1, 3)
        self.height, self.width, self.interpolation = height, width, interpolation

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        where = self.path or "RAM"
        return f"ImageCache({len(self)} x 3 x {self.height} x {self.width} uint8, {self.interpolation}, {where})"

    def __getstate__(self):
        """Pickled (spawned DataLoader workers): a file-backed cache by its path, not its 4 GB of pixels."""
        state = dict(self.__dict__)
        if self.path is not None:
            state["images"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.images is None:
            shape = (len(self.paths), 3, self.height, self.width)
            self.images = torch.from_numpy(np.memmap(self.path, dtype=np.uint8, mode="c", shape=shape))


def build_cache(images, height, width, interpolation="bilinear", path=None, workers=0, progress=True):
    """Decode and resize every image of `images` once; reuse a matching cache file at `path` if there is one.

    images:        data.common.ImageList, [N]
    height, width: the training size; interpolation: that of the pipelines' Resize ("bilinear" for MULT,
                   "bicubic" for MBMIL)
    path:          the .u8 file (its key is path + ".json"), or None to keep the pixels in RAM
    workers:       decoding processes (0: this process)
    Returns an ImageCache; rows are in the order of `images`.
    """
    _check(images, height, width, interpolation, path, workers)
    keys = [_file_key(os.path.abspath(p)) for p in images.paths]    # raises on a missing file
    header = {"format": FORMAT, "height": height, "width": width, "interpolation": interpolation,
              "count": len(images)}
    shape = (len(images), 3, height, width)
    if path is None:
        pixels = np.empty(shape, dtype=np.uint8)
        flags = _decode_rows(images.paths, range(len(images)), pixels, height, width, interpolation, workers,
                             progress)
        return ImageCache(torch.from_numpy(pixels), flags, list(images.paths), height, width, interpolation, None,
                          f"image cache: decoded {len(images)} images to {height}x{width} in RAM")
    stored = _read_key(path)
    if stored is not None and stored["header"] == header and [r[0] for r in stored["rows"]] == [k[0] for k in keys] \
            and os.path.getsize(path) == int(np.prod(shape)):
        changed = [i for i, (row, key) in enumerate(zip(stored["rows"], keys)) if row[1:3] != key[1:3]]
        flags = [row[3:5] for row in stored["rows"]]
        if changed:
            pixels = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
            for i, f in zip(changed, _decode_rows(images.paths, changed, pixels, height, width, interpolation,
                                                  workers, progress)):
                flags[i] = f
            pixels.flush()
            del pixels
            _write_key(path, header, keys, flags)
            names = ", ".join(images.paths[i] for i in changed[:3]) + (" ..." if len(changed) > 3 else "")
            summary = f"image cache {path}: reused, {len(changed)} changed files decoded again ({names})"
        else:
            summary = f"image cache {path}: reused ({len(images)} images, {height}x{width}, {interpolation})"
    else:
        created = _make_folders(os.path.dirname(os.path.abspath(path)))
        tmp = f"{path}.{os.getpid()}.tmp"           # this build's own: another run may build the same file
        try:
            pixels = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
            flags = _decode_rows(images.paths, range(len(images)), pixels, height, width, interpolation, workers,
                                 progress)
            pixels.flush()
            del pixels
            os.replace(tmp, path)
        except BaseException:                       # a failed build leaves nothing behind
            if os.path.exists(tmp):
                os.remove(tmp)
            for folder in reversed(created):
                if not os.listdir(folder):
                    os.rmdir(folder)
            raise
        _write_key(path, header, keys, flags)
        why = "built" if stored is None else "rebuilt (another size, interpolation or list of images)"
        size = shape[0] * 3 * height * width
        size = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        summary = f"image cache {path}: {why}, {len(images)} images, {size}"
    pixels = np.memmap(path, dtype=np.uint8, mode="c", shape=shape)   # copy-on-write: the file is never written
    return ImageCache(torch.from_numpy(pixels), flags, list(images.paths), height, width, interpolation, path,
                      summary)


def training_caches(vis, ir, height, width, interpolation, folder, workers=0):
    """The caches of a run's training images, {"vis", "ir"}: files in `folder` named by `cache_name`, so that runs
    of the same images (an ablation series, a resume) share them."""
    return {m: build_cache(images, height, width, interpolation, workers=workers,
                           path=os.path.join(folder, cache_name(m, images, height, width, interpolation)))
            for m, images in (("vis", vis), ("ir", ir))}


def cache_name(name, images, height, width, interpolation):
    """File name of the cache of `images`: <name>_<H>x<W>_<interpolation>_<hash of the images' absolute
    paths, in order>.u8; another list of images (another dataset or split) gets another file."""
    digest = hashlib.sha1("\n".join(os.path.abspath(p) for p in images.paths).encode()).hexdigest()[:10]
    return f"{name}_{height}x{width}_{interpolation}_{digest}.u8"


def decode_resized(path, height, width, interpolation="bilinear"):
    """One image as the pipelines' first step sees it: read_image + Resize, uint8 [3, H, W] (channel planes)."""
    img = Resize(height, width, interpolation)(read_image(path))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------------
# Steps

class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths, rows, height, width, interpolation):
        self.paths, self.rows = paths, list(rows)
        self.size = (height, width, interpolation)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        """(row, uint8 image [3, H, W]), or (row, the error message) for a file that cannot be decoded: a worker
        never raises, so that the build names every bad file."""
        row = self.rows[i]
        try:
            return row, torch.from_numpy(decode_resized(self.paths[row], *self.size))
        except OSError as err:
            return row, str(err)


def _decode_rows(paths, rows, pixels, height, width, interpolation, workers, progress):
    """pixels[i] = decode_resized(paths[i]) for i in rows, `workers` processes decoding.

    Returns per row [grey, zeros]: grey 1 when the three channels are equal, zeros the number of 0 values
    of each channel. ValueError naming the files that cannot be decoded, after trying every one.
    """
    data = _Decode(paths, rows, height, width, interpolation)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
    flags, errors = [], []
    for i, img in tqdm(loader, total=len(data), desc=f"decode once {height}x{width}", unit="img",
                       disable=not progress, leave=False):
        if isinstance(img, str):
            errors.append(img)
            continue
        pixels[i] = arr = img.numpy()
        grey = int(np.array_equal(arr[0], arr[1]) and np.array_equal(arr[1], arr[2]))
        flags.append([grey, [int(np.count_nonzero(arr[c] == 0)) for c in range(3)]])
    if errors:
        raise unusable(errors, len(data), "training images")
    return flags


def _make_folders(folder):
    """os.makedirs(folder); returns the folders it created, outermost first."""
    created, parent = [], folder
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    return created[::-1]


def _file_key(path):
    """(path, size in bytes, mtime in ns) of an image file; FileNotFoundError naming it when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path} (listed in the training set; the dataset "
                                f"changed on disk: restore the file or rebuild the image list)") from None
    return [path, st.st_size, st.st_mtime_ns]


def _read_key(path):
    try:
        with open(path + ".json") as f:
            key = json.load(f)
    except (OSError, ValueError):
        return None
    return key if isinstance(key, dict) and "header" in key and "rows" in key else None


def _write_key(path, header, keys, flags):
    tmp = f"{path}.json.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"header": header, "rows": [k + f for k, f in zip(keys, flags)]}, f)
    os.replace(tmp, path + ".json")


def _check(images, height, width, interpolation, path, workers):
    if not isinstance(images, ImageList):
        raise TypeError(f"images must be a data.common.ImageList, got {type(images).__name__}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path or None (RAM), got {type(path).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
