"""Shared containers and image decoding for the dataset readers.

Every reader returns `ImageList`s: one per modality (training) or one per query / gallery side
(testing). Rows are in lexicographic order of the image path for training sets, which fixes the
row order that clustering labels depend on (docs/mult.md §0).
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

VIS, IR = 0, 1   # modality codes used everywhere: 0 = visible, 1 = infrared


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


def read_image(path):
    """Decode `path` as a 3-channel RGB PIL image; a missing or corrupt file names itself."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise OSError(f"cannot decode image {path}: {err} (expected a readable JPEG/PNG)") from None
