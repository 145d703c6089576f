"""LLCM readers: the training lists and the official test protocol in both directions, no preprocessing.

Dataset: Zhang & Wang, "Diverse Embedding Expansion Network and Low-Light Cross-Modality Benchmark for
Visible-Infrared Person Re-identification", CVPR 2023: 46,767 images of 1,064 identities from 9 cameras
in low light, each camera recording visible (vis) images by day and near-infrared (ir) ones by night.
Layout and protocol as the dataset's official code (the DEEN and AGW folders of its repository) reads them.

Layout under `root` (the folder that holds `idx/`, `test_vis/` and `test_nir/`):
    idx/train_vis.txt, idx/train_nir.txt   "<path relative to root> <integer label>" per line
    idx/test_id.txt                         comma-separated test ids (one line, or one per line)
    test_vis/cam{1..9}/{pid:04d}/<files>    visible test images
    test_nir/cam{1,2,4..9}/{pid:04d}/<files>   infrared test images; there is no infrared camera 3
                                            (its folder may exist, empty)
Visible camN and infrared camN are one camera in its two modes and share the number N. Hidden entries
(.DS_Store, ._x.jpg) and files that are not images are skipped; a camera folder outside the protocol is
refused. Training: 713 ids, 16,946 visible and 13,975 infrared images, checked like SYSU-MM01's.

Test, per trial t = 0..9 (`random.seed(t)` once, then one `random.choice` per (test id, camera) folder
over its sorted files, ids sorted, cameras ascending):
    "i2v" (the official default): query = every infrared test image, gallery = one visible image per
          (id, visible camera).
    "v2i": query = every visible test image, gallery = one infrared image per (id, infrared camera);
          the direct reading of visible-to-infrared search.
    "v2i_transposed": the official code's own visible-to-infrared mode: it samples the infrared side and
          then swaps the roles, so the sampled infrared images are the queries ranking every visible
          image. Offered for comparison with numbers produced that way; never the default.
The metric (same identity AND same camera number dropped, distinct-identity CMC) is metrics.eval_llcm.
"""
import os
import re
import warnings

import numpy as np

from .common import IR, VIS, ImageList, describe_skipped, list_images, read_id_file
from .sysu import sysu_gallery_draw

LLCM_TRAIN_COUNTS = {"ids": 713, "vis": 16946, "ir": 13975}
VIS_CAMS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
IR_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)
TEST_FOLDERS = {VIS: "test_vis", IR: "test_nir"}
TRAIN_LISTS = {VIS: "train_vis.txt", IR: "train_nir.txt"}
DIRECTIONS = ("i2v", "v2i", "v2i_transposed")
_CAM_DIR = re.compile(r"cam(\d+)")


def llcm_train(root, expected=LLCM_TRAIN_COUNTS):
    """The LLCM training set, from idx/train_vis.txt and idx/train_nir.txt.

    root:     folder holding idx/ (the listed paths are relative to it)
    expected: dict with any of the keys "ids", "vis", "ir" (default: the official 713 / 16,946 / 13,975;
              "ids" counts the distinct labels of both lists); a mismatch raises ValueError. None skips it.
    Returns (vis, ir): ImageLists of N_v and N_r rows in lexicographic order of the full path; pids are
    the listed labels (diagnostics only), camids the number of a `camN` folder in the path (0 if none).
    """
    if expected is not None:
        if not isinstance(expected, dict) or not set(expected) <= {"ids", "vis", "ir"}:
            raise ValueError(f"llcm_train: expected must be None or a dict with keys among 'ids', 'vis', "
                             f"'ir', got {expected!r}")
    root = _check_root(root)
    vis, ir = (_train_list(root, modality) for modality in (VIS, IR))
    _check_disjoint(root, vis, ir)
    found = {"ids": len(set(vis.pids.tolist()) | set(ir.pids.tolist())), "vis": len(vis), "ir": len(ir)}
    if expected is not None and any(found[k] != v for k, v in expected.items()):
        lines = "\n".join(f"  {k:>3}: found {found[k]}, expected {v}" for k, v in expected.items())
        raise ValueError(f"LLCM training set under {root} does not have the expected counts:\n{lines}\n"
                         f"Use the original release (idx/train_vis.txt, idx/train_nir.txt). To train on this "
                         f"data anyway, pass expected=None (training CLI: --allow-count-mismatch).")
    return vis, ir


def llcm_gallery_candidates(root, direction="i2v"):
    """Every test image of the side a trial samples from: visible for "i2v", infrared for "v2i" and
    "v2i_transposed". Rows in the official draw order: test ids sorted, cameras ascending, files sorted,
    so an evaluator can extract features once and index them per trial. Returns an ImageList [N_cand]."""
    _check_direction(direction)
    root = _check_root(root)
    return _test_images(root, IR if direction != "i2v" else VIS)


def llcm_test(root, direction="i2v", trial=0):
    """Query and gallery of one trial of the LLCM test protocol.

    direction: "i2v" (default), "v2i" or "v2i_transposed" (module docstring)
    trial:     int >= 0, the seed of the draw (the protocol averages trials 0..9)
    Returns (query, gallery) ImageLists. The sampled side is drawn from llcm_gallery_candidates(root,
    direction); the other side is every test image of its modality, in the same order. The
    same-identity-and-camera exclusion belongs to the evaluator.
    """
    candidates = llcm_gallery_candidates(root, direction)
    if len(candidates) == 0:
        raise ValueError(f"LLCM under {root}: the test ids have no "
                         f"{'visible' if candidates.modality == VIS else 'infrared'} image in "
                         f"{TEST_FOLDERS[candidates.modality]}/")
    drawn = candidates.subset(sysu_gallery_draw(candidates, trial, "single"))
    every = _test_images(_check_root(root), VIS if candidates.modality == IR else IR)
    if len(every) == 0:
        raise ValueError(f"LLCM under {root}: the test ids have no image in {TEST_FOLDERS[every.modality]}/")
    lost = sorted(set(drawn.pids.tolist()) ^ set(every.pids.tolist()))
    if lost:
        warnings.warn(f"LLCM: {len(lost)} test ids (e.g. {lost[0]}) have images in one modality only; their "
                      f"queries have no match and are skipped by the metric, as in the official protocol")
    return (drawn, every) if direction == "v2i_transposed" else (every, drawn)


# ----------------------------------------------------------------------------- private steps
def _train_list(root, modality):
    """Parse idx/train_{vis,nir}.txt into an ImageList sorted by path; errors name file and line."""
    path = os.path.join(root, "idx", TRAIN_LISTS[modality])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LLCM index file not found: {path}")
    paths, labels, cams = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue                      # blank lines, e.g. a trailing one
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise ValueError(f"{path}:{lineno}: expected '<path relative to the LLCM root> <integer "
                                 f"label>', got {line.strip()[:120]!r}")
            paths.append(os.path.join(root, parts[0]))
            labels.append(int(parts[1]))
            found = [int(m.group(1)) for m in map(_CAM_DIR.fullmatch, parts[0].split("/")[:-1]) if m]
            cams.append(found[-1] if found else 0)
    if not paths:
        raise ValueError(f"LLCM index file {path} lists no image")
    missing = [p for p in paths if not os.path.isfile(p)]
    folders = [p for p in missing if os.path.isdir(p)]
    if folders:
        raise IsADirectoryError(f"LLCM: {folders[0]} (listed in {path}) is a folder; expected an image file "
                                f"(folders: {len(folders)} of the {len(paths)} listed paths)")
    if missing:
        raise FileNotFoundError(f"LLCM image not found: {missing[0]} (listed in {path}; {len(missing)} of "
                                f"{len(paths)} listed images are missing)")
    order = np.array(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)
    return ImageList(paths, labels, cams, modality).subset(order)


def _check_disjoint(root, vis, ir):
    """Refuse training lists that name a test image, as SYSU-MM01's and RegDB's readers do: a training image lying
    in test_vis/ or test_nir/ (its real path, so a link into them counts too)."""
    tests = tuple(os.path.join(os.path.realpath(os.path.join(root, f)), "") for f in TEST_FOLDERS.values())
    for images in (vis, ir):
        # one realpath per folder, and per file only where the file itself is a link: 30k realpaths cost 0.6 s
        real = {d: os.path.join(os.path.realpath(d), "") for d in {os.path.dirname(p) for p in images.paths}}
        shared = [p for p in images.paths if real[os.path.dirname(p)].startswith(tests)
                  or os.path.islink(p) and os.path.realpath(p).startswith(tests)]
        if shared:
            listed = os.path.join(root, "idx", TRAIN_LISTS[images.modality])
            raise ValueError(f"{listed}: test images in the training list ({len(shared)} of its {len(images)}, under "
                             f"test_vis/ or test_nir/), e.g. {os.path.relpath(shared[0], root)}; the training and "
                             f"test sets must be disjoint")


def _test_images(root, modality):
    """Every test image of one modality: ids sorted, then cameras, then file names (the official order)."""
    folder = os.path.join(root, TEST_FOLDERS[modality])
    cams = _test_cameras(folder, modality)
    paths, pids, camids, skipped = [], [], [], []
    for pid in _test_ids(root):
        for cam in cams:
            files = list_images(os.path.join(folder, f"cam{cam}", f"{pid:04d}"), skipped)
            paths += files
            pids += [pid] * len(files)
            camids += [cam] * len(files)
    if skipped:
        warnings.warn("LLCM test set: " + describe_skipped(skipped, root))
    return ImageList(paths, pids, camids, modality)


def _test_cameras(folder, modality):
    """The camera numbers of test_vis/ or test_nir/; a folder outside the protocol is refused by name."""
    allowed, name = (VIS_CAMS, "visible") if modality == VIS else (IR_CAMS, "infrared")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"LLCM test folder not found: {folder}")
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if entry.startswith(".") or not os.path.isdir(full):
            continue
        match = _CAM_DIR.fullmatch(entry)
        cam = int(match.group(1)) if match else None
        if cam in allowed and entry == f"cam{cam}":
            continue
        if modality == IR and entry == "cam3" and not any(_image_files(os.path.join(full, d))
                                                          for d in os.listdir(full)):
            continue                          # the empty infrared camera 3 of the release
        raise ValueError(f"LLCM: {full} is not a camera of the protocol (the {name} test cameras are "
                         f"{', '.join(f'cam{c}' for c in allowed)}); remove or rename it")
    missing = [c for c in allowed if not os.path.isdir(os.path.join(folder, f"cam{c}"))]
    if missing:
        raise FileNotFoundError(f"LLCM camera folder not found: {os.path.join(folder, f'cam{missing[0]}')}")
    return allowed


def _image_files(folder):
    """Sorted full paths of the image files in `folder`, hidden and non-image files skipped; [] if there is
    no such folder."""
    return list_images(folder, [])


def _test_ids(root):
    """The sorted ids of idx/test_id.txt (read_id_file: one line of commas, or one id per line)."""
    return sorted(read_id_file(os.path.join(root, "idx", "test_id.txt"), "LLCM split file"))


def _check_root(root):
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"LLCM root not found: {root} (expected the folder holding idx/, test_vis/ "
                                f"and test_nir/)")
    return root


def _check_direction(direction):
    if direction not in DIRECTIONS:
        raise ValueError(f"LLCM direction must be one of {DIRECTIONS} (i2v: infrared queries, the official "
                         f"default; v2i: visible queries), got {direction!r}")
