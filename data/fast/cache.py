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

Key: `<path>.json` beside the pixels holds the format, height, width, interpolation and, per row (`ROW`), the
source file's identity (data.common.file_keys: size, mtime, ctime, inode and a SHA-1 digest of its bytes), the
source image's size, two facts about the decoded pixels the batched pipeline uses (three equal channels; the
number of 0 values per channel) and the CRC-32 of the row's pixels. A cache trusts nothing it has not checked:
opening an existing one
- checks every source file: a missing file raises FileNotFoundError naming it (the dataset changed under the
  run); a file whose content changed (another digest; a file with another ctime or inode is read and hashed
  again, so a replaced image is noticed even with its size and modification time restored) is decoded again
  into its row, and `cache.summary` names it;
- verifies the CRC-32 of every row: a row whose pixels were damaged (a bad disk, a scrambled or foreign file)
  is decoded again, and the summary says so. Reading 4.25 GB to check it costs seconds: bench/bench_checks.py;
- rebuilds the whole file for another format (an earlier release's cache), height, width, interpolation, list
  of paths or file size.
A file that cannot be decoded raises ValueError naming it (every such file is tried first).

Building: the space the file needs is checked and reserved (posix_fallocate) before any image is decoded, so a
full disk is one line naming the folder and the size, not a bus error halfway through. A build writes its own
temporary file, `<path>.<pid>.tmp`, holding an OS lock (flock) on it while it writes, and renames it into place;
the key is written last, by an atomic rename, so an interrupted build is rebuilt on the next open. A failed build
leaves no file or folder behind; a killed one (SIGKILL, a power cut) leaves its temporary file, which the next
build in that folder removes: only a file whose lock is free and whose process is gone, never a live build's.

Sharing: `cache_name` names a file by its image list, size and interpolation, so runs of one dataset (an ablation
series) can keep one cache in a common folder. Two runs building the same cache at once both decode, each into
its own temporary file, and either's file is the right one.
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from ..common import ImageList, file_keys, read_image, unusable
from ..transforms import _INTERPOLATIONS, Resize

FORMAT = "vireid-image-cache-v2"   # v1 (no checksums, files keyed by size and mtime only) is rebuilt
# One row of the key per image: the source file (path and data.common.file_keys), the source image's size, the
# decoded pixels' facts and the CRC-32 of the row's pixels.
ROW = ("path", "size", "mtime_ns", "ctime_ns", "inode", "digest", "width", "height", "grey", "zeros", "crc32")
_KEY, _FACTS = slice(1, 6), slice(6, 11)           # file_keys' five fields; the facts of the decoded row
_TEMPORARY = re.compile(r".+\.u8(\.json)?\.(\d+)\.tmp")
VERIFY_BLOCK = 64                                  # rows per checksum task (8 MB at 288 x 144)


class ImageCache:
    """uint8 images [N, 3, H, W] (CPU tensor, memory-mapped or in RAM), row i decoded from paths[i].

    grey:  bool [N], the three channels are equal (infrared images stored as RGB)
    zeros: int64 [N, 3], 0 values in each channel (data/fast/draws.py's LinearTransform shortcut)
    sizes: int64 [N, 2], (width, height) of each source image before the resize
    height, width, interpolation: the Resize they went through; path: the .u8 file or None (RAM);
    summary: one line saying what opening or building did.
    """

    def __init__(self, images, facts, paths, height, width, interpolation, path, summary):
        """facts: per row [width, height, grey, zeros [3], crc32] (ROW[6:])."""
        self.images, self.paths, self.path, self.summary = images, paths, path, summary
        self.sizes = torch.tensor([f[:2] for f in facts], dtype=torch.int64).view(-1, 2)
        self.grey = torch.tensor([bool(f[2]) for f in facts], dtype=torch.bool)
        self.zeros = torch.tensor([f[3] for f in facts], dtype=torch.int64).view(-1, 3)
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


def build_cache(images, height, width, interpolation="bilinear", path=None, workers=0, progress=True, keys=None):
    """Decode and resize every image of `images` once; reuse a matching cache file at `path` if there is one,
    after checking it (module docstring).

    images:        data.common.ImageList, [N]
    height, width: the training size; interpolation: that of the pipelines' Resize ("bilinear" for MULT,
                   "bicubic" for MBMIL)
    path:          the .u8 file (its key is path + ".json"), or None to keep the pixels in RAM
    workers:       decoding processes (0: this process)
    keys:          data.common.file_keys of images.paths, when the caller has them already (None: computed)
    Returns an ImageCache; rows are in the order of `images`.
    """
    _check(images, height, width, interpolation, path, workers, keys)
    shape = (len(images), 3, height, width)
    if path is None:
        pixels = np.empty(shape, dtype=np.uint8)
        facts = _decode_rows(images.paths, range(len(images)), pixels, height, width, interpolation, workers,
                             progress)
        return ImageCache(torch.from_numpy(pixels), facts, list(images.paths), height, width, interpolation, None,
                          f"image cache: decoded {len(images)} images to {height}x{width} in RAM")
    path = os.fspath(path)
    paths = [os.path.abspath(p) for p in images.paths]
    swept = sweep_temporaries(os.path.dirname(os.path.abspath(path)))
    header = {"format": FORMAT, "height": height, "width": width, "interpolation": interpolation,
              "count": len(images)}
    stored = _read_key(path)
    current = stored is not None and stored["header"].get("format") == FORMAT
    known = {row[0]: row[_KEY] for row in stored["rows"]} if current else {}
    keys = file_keys(paths, known) if keys is None else [list(k) for k in keys]    # raises on a missing file
    why = _why_rebuild(path, stored, header, paths, shape)
    if why is None:
        facts, summary = _reuse(path, images, keys, stored["rows"], shape, interpolation, workers, progress)
        if summary is not None:
            _write_key(path, header, paths, keys, facts)
        summary = summary or f"image cache {path}: reused ({len(images)} images, {height}x{width}, " \
                             f"{interpolation}; every row's checksum verified)"
    else:
        facts = _build(path, images, shape, interpolation, workers, progress)
        _write_key(path, header, paths, keys, facts)
        summary = f"image cache {path}: {why}, {len(images)} images, {_size(int(np.prod(shape)))}"
    if swept:
        summary += (f"; removed {len(swept)} temporary file{'s' * (len(swept) > 1)} of a build that was killed ("
                    + ", ".join(f"{name}, {_size(size)}" for name, size in swept[:3]) + ")")
    pixels = np.memmap(path, dtype=np.uint8, mode="c", shape=shape)   # copy-on-write: the file is never written
    return ImageCache(torch.from_numpy(pixels), facts, list(images.paths), height, width, interpolation, path,
                      summary)


def training_caches(vis, ir, height, width, interpolation, folder, workers=0, keys=None):
    """The caches of a run's training images, {"vis", "ir"}: files in `folder` named by `cache_name`, so that runs
    of the same images (an ablation series, a resume) share them. The space both need is checked before either
    is built. keys: {"vis", "ir"} data.common.file_keys of their paths, or None."""
    lists = {"vis": vis, "ir": ir}
    paths = {m: os.path.join(folder, cache_name(m, images, height, width, interpolation))
             for m, images in lists.items()}
    need = sum(len(images) * 3 * height * width for m, images in lists.items()
               if not _has_size(paths[m], len(images) * 3 * height * width))
    check_space(folder, need, "the image caches of this run")
    return {m: build_cache(images, height, width, interpolation, workers=workers, path=paths[m],
                           keys=None if keys is None else keys[m])
            for m, images in lists.items()}


def cache_name(name, images, height, width, interpolation):
    """File name of the cache of `images`: <name>_<H>x<W>_<interpolation>_<hash of the images' absolute
    paths, in order>.u8; another list of images (another dataset or split) gets another file."""
    digest = hashlib.sha1("\n".join(os.path.abspath(p) for p in images.paths).encode()).hexdigest()[:10]
    return f"{name}_{height}x{width}_{interpolation}_{digest}.u8"


def decode_resized(path, height, width, interpolation="bilinear"):
    """One image as the pipelines' first step sees it: read_image + Resize, uint8 [3, H, W] (channel planes)."""
    return _decode(path, height, width, interpolation)[0]


def check_space(folder, need, what):
    """OSError in one line when the file system of `folder` (or of its nearest existing parent) has fewer than
    `need` bytes free."""
    parent = os.path.abspath(folder)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise OSError(f"not enough space for {what} in {folder}: {_size(need)} needed, {_size(free)} free; free "
                      f"some space there or give --cache-dir a folder with room")


def sweep_temporaries(folder):
    """Remove the temporary files that killed builds left in `folder` -> [(name, size in bytes)] removed.

    A temporary file (<cache>.u8.<pid>.tmp, <cache>.u8.json.<pid>.tmp) is removed only when no process holds its
    lock (a build holds it while it writes; the OS drops it when the process dies, however it dies) and its
    process id is not that of a live process here: a live concurrent build's file, on this machine or on another
    one sharing the folder, is never touched. A reused process id keeps a dead build's file until that process
    ends, which errs on the safe side."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        match = _TEMPORARY.fullmatch(name)
        if not match or _alive(int(match.group(2))):
            continue
        full = os.path.join(folder, name)
        try:
            fd = os.open(full, os.O_RDWR)
        except OSError:                               # gone already, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if st.st_nlink and os.stat(full).st_ino == st.st_ino:    # still the file this lock is on
                os.remove(full)
                removed.append((name, st.st_size))
        except OSError:                               # BlockingIOError: its writer is alive
            pass
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------------------------------------------
# Steps

def _why_rebuild(path, stored, header, paths, shape):
    """None when the stored key and file can be reused (after their checks), else why the file is built."""
    if not os.path.exists(path):
        return "built"
    if stored is None:
        return "rebuilt (its key is missing or unreadable)"
    if stored["header"].get("format") != FORMAT:
        return "rebuilt (an earlier release's format, without checksums)"
    if stored["header"] != header or [row[0] for row in stored["rows"]] != paths:
        return "rebuilt (another size, interpolation or list of images)"
    if not _has_size(path, int(np.prod(shape))):
        return "rebuilt (the file has another size than its key says: truncated or foreign)"
    return None


def _reuse(path, images, keys, rows, shape, interpolation, workers, progress):
    """Check a cache file against its key: rows whose source file changed, or whose pixels no longer match their
    checksum, are decoded again in place. -> (facts per row, summary or None when nothing changed)."""
    changed = [i for i, (row, key) in enumerate(zip(rows, keys)) if row[5] != key[4]]
    renamed = [i for i, (row, key) in enumerate(zip(rows, keys)) if row[_KEY] != key and row[5] == key[4]]
    facts = [row[_FACTS] for row in rows]
    redo = set(changed)
    pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
    todo = [i for i in range(len(rows)) if i not in redo]
    damaged = [i for i, crc in zip(todo, _checksums(pixels, todo, progress)) if crc != facts[i][4]]
    del pixels
    redo = sorted(redo | set(damaged))
    if redo:
        pixels = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
        for i, f in zip(redo, _decode_rows(images.paths, redo, pixels, shape[2], shape[3], interpolation, workers,
                                           progress)):
            facts[i] = f
        pixels.flush()
        del pixels
    if not (redo or renamed):
        return facts, None

    def names(some):
        return ", ".join(images.paths[i] for i in some[:3]) + (" ..." if len(some) > 3 else "")

    def files(n):
        return f"{n} file{'s' * (n != 1)}"
    parts = [f"{files(len(changed))} changed, decoded again ({names(changed)})"] * bool(changed)
    parts += [f"{len(damaged)} of {len(rows)} rows damaged (their pixels no longer match their checksum) and "
              f"decoded again ({names(damaged)})"] * bool(damaged)
    parts += [f"{files(len(renamed))} with a new ctime or inode but the same content"] * bool(renamed)
    return facts, f"image cache {path}: reused, " + "; ".join(parts)


def _checksums(pixels, rows, progress):
    """CRC-32 of pixels[i] for i in rows, read and computed in threads (zlib releases the GIL on large buffers)."""
    blocks = [rows[k:k + VERIFY_BLOCK] for k in range(0, len(rows), VERIFY_BLOCK)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        done = pool.map(lambda block: [zlib.crc32(pixels[i]) for i in block], blocks)
        return [crc for block in tqdm(done, total=len(blocks), desc="verify image cache", unit="block",
                                      disable=not progress, leave=False) for crc in block]


def _build(path, images, shape, interpolation, workers, progress):
    """Decode every image into a new file at `path` (a temporary file, its space reserved first, then renamed
    into place) -> facts per row. A failure removes the temporary file and the folders this made."""
    folder = os.path.dirname(os.path.abspath(path))
    created = _make_folders(folder)
    tmp, fd = f"{path}.{os.getpid()}.tmp", None   # this build's own: another run may build the same file
    need = int(np.prod(shape))
    try:
        check_space(folder, need, f"the image cache {os.path.basename(path)}")
        fd = _create_locked(tmp)
        _reserve(fd, need, folder, path)
        pixels = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)
        facts = _decode_rows(images.paths, range(len(images)), pixels, shape[2], shape[3], interpolation, workers,
                             progress)
        pixels.flush()
        del pixels
        os.replace(tmp, path)
    except BaseException:                       # a failed build leaves nothing behind
        if fd is not None and os.path.exists(tmp):
            os.remove(tmp)
        for folder in reversed(created):
            if not os.listdir(folder):
                os.rmdir(folder)
        raise
    finally:
        if fd is not None:
            os.close(fd)                        # releases the lock, after the rename
    return facts


def _create_locked(tmp):
    """Create the temporary file `tmp` and hold an exclusive flock on it while this process writes it: the lock
    tells a later run's sweep that its writer is alive. -> the file descriptor."""
    try:
        os.remove(tmp)                          # our own process id's: left by a dead process of the same id
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if os.fstat(fd).st_nlink == 0:              # a sweep removed it between our open and our lock: again
        os.close(fd)
        return _create_locked(tmp)
    return fd


def _reserve(fd, need, folder, path):
    """Reserve `need` bytes for the file: with the blocks allocated up front, writing the memory map cannot fail
    halfway with SIGBUS (a bus error) on a full disk."""
    try:
        os.posix_fallocate(fd, 0, need)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(f"not enough space for the image cache {os.path.basename(path)} in {folder}: "
                          f"{_size(need)} needed ({os.strerror(err.errno)}); free some space there or give "
                          f"--cache-dir a folder with room") from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, need)                  # a file system that cannot reserve: its free space was checked


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths, rows, height, width, interpolation):
        self.paths, self.rows = paths, list(rows)
        self.size = (height, width, interpolation)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        """(row, uint8 image [3, H, W], (width, height) before the resize), or (row, the error message, None)
        for a file that cannot be decoded: a worker never raises, so that the build names every bad file."""
        row = self.rows[i]
        try:
            arr, size = _decode(self.paths[row], *self.size)
            return row, torch.from_numpy(arr), size
        except OSError as err:
            return row, str(err), None


def _decode(path, height, width, interpolation):
    img = read_image(path)
    resized = Resize(height, width, interpolation)(img)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)), list(img.size)


def _decode_rows(paths, rows, pixels, height, width, interpolation, workers, progress):
    """pixels[i] = decode_resized(paths[i]) for i in rows, `workers` processes decoding.

    Returns per row [width, height, grey, zeros, crc32] (ROW[6:]): the source image's size, grey 1 when the three
    channels are equal, zeros the number of 0 values of each channel, the CRC-32 of the row's bytes. ValueError
    naming the files that cannot be decoded, after trying every one.
    """
    data = _Decode(paths, rows, height, width, interpolation)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
    facts, errors = [], []
    for i, img, size in tqdm(loader, total=len(data), desc=f"decode once {height}x{width}", unit="img",
                             disable=not progress, leave=False):
        if isinstance(img, str):
            errors.append(img)
            continue
        pixels[i] = arr = img.numpy()
        grey = int(np.array_equal(arr[0], arr[1]) and np.array_equal(arr[1], arr[2]))
        facts.append([int(size[0]), int(size[1]), grey, [int(np.count_nonzero(arr[c] == 0)) for c in range(3)],
                      zlib.crc32(arr)])
    if errors:
        raise unusable(errors, len(data), "training images")
    return facts


def _make_folders(folder):
    """os.makedirs(folder); returns the folders it created, outermost first."""
    created, parent = [], folder
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    return created[::-1]


def _has_size(path, nbytes):
    try:
        return os.path.getsize(path) == nbytes
    except OSError:
        return False


def _alive(pid):
    """Whether a process `pid` runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _size(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _read_key(path):
    """The stored key, or None when there is none or it cannot be read. A key of another format is returned as it
    is, for `_why_rebuild` to name; its rows are never used."""
    try:
        with open(path + ".json") as f:
            key = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(key, dict) and isinstance(key.get("header"), dict) and isinstance(key.get("rows"), list)):
        return None
    if key["header"].get("format") == FORMAT and not all(isinstance(r, list) and len(r) == len(ROW)
                                                         for r in key["rows"]):
        return None
    return key


def _write_key(path, header, paths, keys, facts):
    """The key, written to a locked temporary file and renamed over `path`.json."""
    tmp = f"{path}.json.{os.getpid()}.tmp"
    fd = _create_locked(tmp)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"header": header, "rows": [[p] + k + f for p, k, f in zip(paths, keys, facts)]}, f)
            f.flush()
            os.replace(tmp, path + ".json")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check(images, height, width, interpolation, path, workers, keys):
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
    if keys is not None and len(keys) != len(images):
        raise ValueError(f"keys must hold one data.common.file_keys row per image ({len(images)}), got {len(keys)}")
