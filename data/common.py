"""Shared containers and image decoding for the dataset readers.

Every reader returns `ImageList`s: one per modality (training) or one per query / gallery side
(testing). Rows are in lexicographic order of the image path for training sets, which fixes the
row order that clustering labels depend on (docs/mult.md §0).
"""
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

VIS, IR = 0, 1   # modality codes used everywhere: 0 = visible, 1 = infrared
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class ImageList:
    """A list of images of one modality.

    paths:    absolute image paths, [N]
    pids:     int64 [N] ground-truth identities (diagnostics and evaluation only, never training)
    camids:   int64 [N] camera ids (SYSU: 1..6; RegDB: 1 visible, 2 thermal)
    modality: VIS or IR
    """
    paths: list
    pids: np.ndarray
    camids: np.ndarray
    modality: int

    def __post_init__(self):
        self.pids = np.asarray(self.pids, dtype=np.int64)
        self.camids = np.asarray(self.camids, dtype=np.int64)
        if not (len(self.paths) == len(self.pids) == len(self.camids)):
            raise ValueError(f"ImageList: {len(self.paths)} paths, {len(self.pids)} pids and "
                             f"{len(self.camids)} camids; expected equal lengths")
        if self.modality not in (VIS, IR):
            raise ValueError(f"ImageList: modality must be {VIS} (visible) or {IR} (infrared), "
                             f"got {self.modality!r}")

    def __len__(self):
        return len(self.paths)

    def subset(self, index):
        """The rows `index` (int array or boolean mask), in that order."""
        index = np.arange(len(self))[np.asarray(index)]
        return ImageList([self.paths[i] for i in index], self.pids[index], self.camids[index],
                         self.modality)


def is_image_file(name):
    """True for a file name a dataset folder may hold as an image: not hidden (.DS_Store, the
    ._0001.jpg of macOS copies), with an image extension."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder, skipped):
    """Sorted full paths of the image files in `folder` ([] if it does not exist); the full paths
    of other entries (hidden, not an image, a sub-folder) are appended to `skipped`, a sub-folder
    with a trailing "/" so that one named like an image (0001.jpg/) is told apart from a file."""
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as it:
        entries = sorted((e.name, e.is_file()) for e in it)
    skipped += [os.path.join(folder, n) + ("" if is_file else "/") for n, is_file in entries
                if not (is_file and is_image_file(n)) and (is_file or not n.startswith("."))]
    return [os.path.join(folder, n) for n, is_file in entries if is_file and is_image_file(n)]


def describe_skipped(skipped, root):
    """One sentence about the entries a reader left out, naming the first few; a folder named like an
    image (0001.jpg/) is called out, since an image was most likely meant to be there."""
    files = [p for p in skipped if not p.endswith("/")]
    folders = [p for p in skipped if p.endswith("/")]
    names = ", ".join(os.path.relpath(p, root) + "/" * p.endswith("/") for p in skipped[:5])
    parts = [f"{len(files)} hidden or non-image file{'s' * (len(files) > 1)}"] * bool(files)
    parts += [f"{len(folders)} folder{'s' * (len(folders) > 1)}"] * bool(folders)
    odd = [p for p in folders if is_image_file(os.path.basename(p[:-1]))]
    note = (f" ({len(odd)} named like an image, e.g. {os.path.relpath(odd[0][:-1], root)}/: expected an "
            f"image file there, found a folder)") if odd else ""
    return (f"skipped {' and '.join(parts)} under {root}: {names}{', ...' if len(skipped) > 5 else ''}{note}")


def read_id_file(path, what="split file"):
    """The identities of a split file: integers separated by commas on one line (the releases' form) or on
    several lines, one per line included. A token that is not an integer, or an id listed twice, is refused
    with its line number."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    ids, line_of = [], {}
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            for tok in line.replace(",", " ").split():
                if not tok.isdigit():
                    raise ValueError(f"{path}:{lineno}: expected integer ids separated by commas "
                                     f"(or one per line), got {tok[:40]!r} in {line.strip()[:80]!r}")
                pid = int(tok)
                if pid in line_of:
                    raise ValueError(f"{path}:{lineno}: id {pid} is listed twice (first on line "
                                     f"{line_of[pid]}); expected each id once")
                line_of[pid] = lineno
                ids.append(pid)
    if not ids:
        raise ValueError(f"{path}:1: expected comma-separated integer ids, found none")
    return ids


def unusable(errors, count, what):
    """The ValueError for images that cannot be decoded: how many of `count` `what`, naming the first three
    (errors: read_image's messages)."""
    return ValueError(f"{len(errors)} of {count} {what} cannot be used: " + "; ".join(errors[:3]) +
                      ("; ..." if len(errors) > 3 else ""))


def file_keys(paths, known=None, threads=4):
    """What each file is, strongly enough to notice a replaced image: per path [size, mtime_ns, ctime_ns, inode,
    digest], digest the first 16 hex digits of the SHA-1 of the file's bytes.

    The content digest is what is compared; the four stat fields only decide whether a file must be read again.
    A file whose [size, mtime_ns, ctime_ns, inode] equal `known[path][:4]` (an earlier call's row) keeps that
    row's digest without being read: an image replaced with the same size and its modification time restored
    still gets a new ctime (os.utime sets it to now) or a new inode, and so is read and hashed again. Every other
    file is read and hashed, `threads` at a time (hashlib and file reads release the GIL). What this does not
    catch: a change that keeps all four fields (a raw write to the disk device, or a file system that does not
    keep ctime), unless `known` is None. FileNotFoundError / IsADirectoryError naming a missing or folder path.
    """
    known = known or {}
    keys = [_stat_key(p) for p in paths]
    stale = [i for i, (p, k) in enumerate(zip(paths, keys)) if list(known.get(p, ())[:4]) != k]
    # Chunks of files per task: a task per file costs more in the pool than hashing a 10 kB file; threads still hide
    # the latency of a cold disk or a network file system.
    chunks = [stale[k:k + 256] for k in range(0, len(stale), 256)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        hashed = [d for chunk in pool.map(lambda rows: [_digest(paths[i]) for i in rows], chunks) for d in chunk]
    digests = dict(zip(stale, hashed))
    return [k + [digests[i] if i in digests else known[p][4]] for i, (p, k) in enumerate(zip(paths, keys))]


def _stat_key(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path} (the dataset changed on disk: restore the file "
                                f"or rebuild the image list)") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise (IsADirectoryError if stat.S_ISDIR(st.st_mode) else OSError)(
            f"{path} is {what}; expected an image file there")
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


def read_image(path):
    """Decode `path` as an 8-bit, 3-channel RGB PIL image; a missing or undecodable file names itself.

    16-bit images (PIL modes I;16*, or I with values in 0..65535) are scaled to 8 bits (v / 257,
    rounded); PIL's own convert("RGB") would clip them to white. Palette, grey and alpha images
    convert as PIL converts them. Float images are refused.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):
                return _sixteen_bit_to_rgb(img, path)
            if img.mode == "F":
                raise ValueError("floating-point pixels (mode F)")
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise OSError(f"cannot decode image {path}: {err} (expected an 8- or 16-bit JPEG/PNG/BMP)") from None


def _sixteen_bit_to_rgb(img, path):
    """A single-channel integer image with values in 0..65535 -> 8-bit RGB, v / 257 rounded."""
    values = np.asarray(img, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"integer pixels outside 0..65535 (mode {img.mode}, "
                         f"{values.min()}..{values.max()})")
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)        # round(v / 257)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
