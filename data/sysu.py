"""SYSU-MM01 readers: the raw training set and the official test protocol, no preprocessing.

Dataset: Wu et al., "RGB-Infrared Cross-Modality Person Re-Identification", ICCV 2017.
Protocol as used by MULT (He et al., IJCV 2024; docs/mult.md §1.1 data, §9 evaluation) and
MBMIL (Wang et al., AAAI 2026; docs/mbmil.md §A.4), both taken from the AGW evaluation code.

Layout under `root` (the folder that holds `cam1..cam6/` and `exp/`):
    cam{c}/{pid:04d}/{file}.jpg     visible cams 1, 2, 4, 5; infrared cams 3, 6
    exp/train_id.txt, exp/val_id.txt, exp/test_id.txt   comma-separated ids (one line, or one per line)
Some (id, camera) folders do not exist in the real data; they are skipped.

Training ids are train_id ∪ val_id (296 + 99 = 395 ids, 22,258 visible and 11,909 infrared
images). The readers check these counts, because a silently broken copy of the dataset costs
accuracy without any other symptom (docs/notes.md C.1).

Test: query = every infrared image (cams 3 and 6) of the 96 test ids; gallery = per trial, one
visible image (single-shot) or up to ten (multi-shot) per (test id, gallery camera), drawn with
Python's `random` seeded by the trial number, exactly as the official code draws them.
"""
import os
import warnings
import random

import numpy as np

from .common import IR, VIS, ImageList, describe_skipped, list_images, read_id_file

SYSU_TRAIN_COUNTS = {"ids": 395, "vis": 22258, "ir": 11909}
VIS_CAMS = (1, 2, 4, 5)
IR_CAMS = (3, 6)
GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
MULTI_SHOT = 10   # gallery images per (id, camera) in multi-shot mode, at most


def _check_root(root, cams):
    """Absolute root; FileNotFoundError naming the first missing root or cam folder."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"SYSU-MM01 root not found: {root} (expected the folder holding "
                                f"cam1..cam6/ and exp/)")
    for cam in cams:
        folder = os.path.join(root, f"cam{cam}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"SYSU-MM01 camera folder not found: {folder}")
    return root


def _read_ids(root, name):
    """The ids of exp/{name} (read_id_file: one line of commas, or one id per line)."""
    return read_id_file(os.path.join(root, "exp", name), "SYSU-MM01 split file")


def _files(root, cam, pid, skipped):
    """Sorted full paths of the images in cam{cam}/{pid:04d}/; [] if there is no such folder.
    Hidden and non-image files are left out and appended to `skipped`."""
    return list_images(os.path.join(root, f"cam{cam}", f"{pid:04d}"), skipped)


def _collect(root, pids, cams, modality, skipped=None):
    """ImageList of every image of cams x pids, id-major then camera then sorted file name;
    files that are not images go to `skipped` (a list), or a warning when it is None."""
    paths, pid_col, cam_col, left_out = [], [], [], []
    for pid in pids:
        for cam in cams:
            files = _files(root, cam, pid, left_out)
            paths += files
            pid_col += [pid] * len(files)
            cam_col += [cam] * len(files)
    if skipped is not None:
        skipped += left_out
    elif left_out:
        warnings.warn("SYSU-MM01: " + describe_skipped(left_out, root))
    return ImageList(paths, np.array(pid_col, dtype=np.int64), np.array(cam_col, dtype=np.int64),
                     modality)


def _sorted_by_path(images):
    """The same rows in lexicographic order of the path (the row order clustering relies on)."""
    order = sorted(range(len(images)), key=images.paths.__getitem__)
    return images.subset(np.array(order, dtype=np.int64))


def sysu_train(root, expected=SYSU_TRAIN_COUNTS):
    """The SYSU-MM01 training set, train_id ∪ val_id (docs/mult.md §1.1).

    root:     folder holding cam1..cam6/ and exp/
    expected: dict with any of the keys "ids", "vis", "ir" (default: the standard 395 / 22,258 /
              11,909); a mismatch raises ValueError. None skips the check.
    Returns (vis, ir): ImageLists of N_v and N_r rows in lexicographic order of the full path;
    pids are the raw dataset ids (diagnostics only), camids the camera folder numbers.
    """
    if expected is not None:
        if not isinstance(expected, dict) or not set(expected) <= {"ids", "vis", "ir"}:
            raise ValueError(f"sysu_train: expected must be None or a dict with keys among "
                             f"'ids', 'vis', 'ir', got {expected!r}")
    root = _check_root(root, sorted(VIS_CAMS + IR_CAMS))
    pids = sorted(set(_read_ids(root, "train_id.txt")) | set(_read_ids(root, "val_id.txt")))
    test_path = os.path.join(root, "exp", "test_id.txt")
    if os.path.isfile(test_path):
        shared = sorted(set(pids) & set(_read_ids(root, "test_id.txt")))
        if shared:
            raise ValueError(f"{test_path}: {len(shared)} test ids are also training ids (in "
                             f"exp/train_id.txt or exp/val_id.txt), e.g. {shared[:5]}; the splits "
                             f"must be disjoint")
    skipped = []
    vis = _sorted_by_path(_collect(root, pids, VIS_CAMS, VIS, skipped))
    ir = _sorted_by_path(_collect(root, pids, IR_CAMS, IR, skipped))
    if skipped:
        warnings.warn("SYSU-MM01 training set: " + describe_skipped(skipped, root))

    missing = [(name, pid) for name, images in (("visible", vis), ("infrared", ir))
               for pid in sorted(set(pids) - set(images.pids.tolist()))]
    found = {"ids": len(pids), "vis": len(vis), "ir": len(ir)}
    if expected is not None and any(found[k] != v for k, v in expected.items()):
        lines = "\n".join(f"  {k:>3}: found {found[k]}, expected {v}" for k, v in expected.items())
        extra = ""
        if missing:
            extra = (f"\n{len(missing)} (modality, training id) pairs have no image at all, e.g. "
                     + ", ".join(f"{name} id {pid}" for name, pid in missing[:5]) + ".")
        if skipped:
            extra += f"\nNot counted: {describe_skipped(skipped, root)}."
        raise ValueError(
            f"SYSU-MM01 training set under {root} does not have the expected counts:\n"
            f"{lines}{extra}\n"
            f"A preprocessing error of exactly this kind (367 ids / 11,333 infrared images instead "
            f"of 395 / 11,909) cost one user of published code about 5 Rank-1 points. Use the "
            f"original release (cam1..cam6/, exp/). To train on this data anyway, pass "
            f"expected=None (training CLI: --allow-count-mismatch).")
    if missing:
        name, pid = missing[0]
        raise ValueError(f"SYSU-MM01 training id {pid} has no {name} image under {root} "
                         f"({len(missing)} (modality, id) pairs are empty); every id listed in "
                         f"exp/train_id.txt or exp/val_id.txt needs images in both modalities")
    return vis, ir


def _check_mode(mode):
    if mode not in GALLERY_CAMS:
        raise ValueError(f"mode must be 'all' or 'indoor', got {mode!r}")


def sysu_gallery_candidates(root, mode="all"):
    """Every visible image of the gallery cameras of the test ids (docs/mult.md §9).

    Rows in the official draw order: for pid in sorted test ids, for cam in GALLERY_CAMS[mode],
    the folder's files sorted. `sysu_gallery_draw` picks each trial's gallery from these rows,
    so an evaluator can extract features once and index them per trial.
    Returns an ImageList (modality VIS) of all candidates, [N_cand].
    """
    _check_mode(mode)
    root = _check_root(root, GALLERY_CAMS[mode])
    return _collect(root, sorted(_read_ids(root, "test_id.txt")), GALLERY_CAMS[mode], VIS)


def sysu_gallery_draw(candidates, trial=0, shot="single"):
    """Row indices into `candidates` of one trial's gallery, the official draw (docs/mult.md §9).

    A fresh random.Random(trial) (same stream as `random.seed(trial)`) walks the (id, camera)
    groups of `candidates` in order; single-shot takes rng.choice(files), multi-shot
    rng.sample(files, min(10, len(files))). Both depend only on the group sizes, so drawing
    indices equals drawing paths.
    candidates: ImageList from sysu_gallery_candidates, [N_cand]
    Returns int64 [N_gallery] row indices (301 all-search / 112 indoor, single-shot, on real data).
    """
    if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)) or trial < 0:
        raise ValueError(f"trial must be an int >= 0 (the gallery seed), got {trial!r}")
    if shot not in ("single", "multi"):
        raise ValueError(f"shot must be 'single' or 'multi', got {shot!r}")
    if len(candidates) == 0:
        raise ValueError("sysu_gallery_draw: candidates is empty; no gallery image to draw")
    rng = random.Random(int(trial))
    # group boundaries: rows where (pid, cam) changes; groups are contiguous by construction
    change = (np.diff(candidates.pids) != 0) | (np.diff(candidates.camids) != 0)
    bounds = np.concatenate([[0], np.flatnonzero(change) + 1, [len(candidates)]]).tolist()
    picked = []
    for start, stop in zip(bounds[:-1], bounds[1:]):   # one iteration per (id, camera) folder
        rows = range(start, stop)
        if shot == "single":
            picked.append(rng.choice(rows))
        else:
            picked += rng.sample(rows, min(MULTI_SHOT, len(rows)))
    return np.array(picked, dtype=np.int64)


def sysu_test(root, mode="all", trial=0, shot="single"):
    """Query and one trial's gallery of the SYSU-MM01 test protocol (docs/mult.md §9).

    mode:  "all" (gallery cams 1, 2, 4, 5) or "indoor" (cams 1, 2)
    trial: int >= 0, the gallery seed (the usual protocol averages trials 0..9)
    shot:  "single" (one image per id and camera) or "multi" (up to 10)
    Returns (query, gallery): query = every infrared image of cams 3 and 6 of the test ids
    (3,803 on real data, the same for both modes), ordered pid-major, then camera 3 before 6,
    then file name (the official order); gallery = the trial's draw from
    sysu_gallery_candidates(root, mode). The cam3 -> cam2 exclusion belongs to the evaluator.
    """
    _check_mode(mode)
    candidates = sysu_gallery_candidates(root, mode)
    index = sysu_gallery_draw(candidates, trial, shot)
    root = _check_root(root, IR_CAMS)
    test_ids = sorted(_read_ids(root, "test_id.txt"))
    query = _collect(root, test_ids, IR_CAMS, IR)
    if len(query) == 0:
        raise ValueError(f"SYSU-MM01 under {root}: the test ids have no infrared image in "
                         f"cam3/ or cam6/")
    lost = sorted(set(query.pids.tolist()) - set(candidates.pids.tolist()))
    if lost and mode == "indoor":
        # Not every person walked past the indoor cameras: the official indoor protocol still queries
        # every IR image and its metric skips queries without a match. Say so rather than stop.
        warnings.warn(f"SYSU-MM01 indoor search: {len(lost)} test ids (e.g. {lost[0]}) have no image in "
                      f"cams 1-2; their queries have no match and are skipped by the metric, as in the "
                      f"official protocol")
    elif lost:
        raise ValueError(f"SYSU-MM01 test id {lost[0]} has query images but no image in the "
                         f"{mode}-search gallery cameras {GALLERY_CAMS[mode]} under {root} "
                         f"({len(lost)} such ids); the dataset copy is incomplete")
    return query, candidates.subset(index)
