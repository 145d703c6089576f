"""Shared containers and image decoding for the dataset readers.

Every reader returns `ImageList`s: one per modality (training) or one per query / gallery side
(testing). Rows are in lexicographic order of the image path for training sets, which fixes the
row order that clustering labels depend on (docs/mult.md §0).
"""
import os
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
    of other files (hidden, not an image) are appended to `skipped`."""
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file())
    skipped += [os.path.join(folder, n) for n in names if not is_image_file(n)]
    return [os.path.join(folder, n) for n in names if is_image_file(n)]


def describe_skipped(skipped, root):
    """One sentence about the files a reader left out, naming the first few."""
    names = ", ".join(os.path.relpath(p, root) for p in skipped[:5])
    return (f"skipped {len(skipped)} hidden or non-image file{'s' * (len(skipped) > 1)} under "
            f"{root}: {names}{', ...' if len(skipped) > 5 else ''}")


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
