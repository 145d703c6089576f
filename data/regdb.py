"""RegDB readers: one train / test identity split per trial, from the index files.

Dataset: Nguyen et al., "Person Recognition System Based on a Combination of Body Images from
Visible Light and Thermal Cameras", Sensors 2017. Protocol as used by MULT (He et al., IJCV 2024;
docs/mult.md §1.2 data, §9 evaluation) and MBMIL (Wang et al., AAAI 2026; docs/mbmil.md §A.4).

Layout under `root` (the folder that holds `idx/` and the image folders):
    idx/train_visible_{t}.txt  idx/train_thermal_{t}.txt
    idx/test_visible_{t}.txt   idx/test_thermal_{t}.txt        t = 1..10
each line `<path relative to root> <integer label>`, separated by one space.
412 ids with 10 visible and 10 thermal images each; every trial is a different random 206 / 206
identity split (2,060 training and 2,060 test images per modality). The standard protocol
trains one model per trial and averages the ten results.

Paper vs official code: MULT's code hard-codes trial 1 and gives every training image camera 0;
here the trial is an argument and camids are 1 (visible) and 2 (thermal) throughout.
"""
import os

import numpy as np

from .common import IR, VIS, ImageList

REGDB_TRIALS = range(1, 11)
VIS_CAMID, IR_CAMID = 1, 2


def _check_trial(trial):
    is_int = isinstance(trial, (int, np.integer)) and not isinstance(trial, bool)
    if not is_int or trial not in REGDB_TRIALS:
        raise ValueError(f"RegDB trial must be an int in 1..10, got {trial!r}: RegDB has trials "
                         f"1..10 (ten train/test identity splits) and one model is trained per "
                         f"trial, then tested on the same trial's split")
    return int(trial)


def _read_index(root, name, check_files=True):
    """Parse idx/{name}: (absolute paths [N], int64 labels [N]) in file order."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"RegDB root not found: {root} (expected the folder holding idx/)")
    path = os.path.join(root, "idx", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RegDB index file not found: {path}")
    paths, labels, line_of = [], [], {}
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue   # tolerate blank lines (e.g. a trailing empty line)
            parts = line.split(" ")
            try:
                if len(parts) != 2 or not parts[0]:
                    raise ValueError
                label = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected '<relative path> <integer label>' "
                                 f"separated by one space, got {line[:120]!r}") from None
            if parts[0] in line_of:
                raise ValueError(f"{path}:{lineno}: {parts[0]} is listed twice (first on line "
                                 f"{line_of[parts[0]]}); expected each image once")
            line_of[parts[0]] = lineno
            paths.append(os.path.join(root, parts[0]))
            labels.append(label)
    if not paths:
        raise ValueError(f"RegDB index file {path} lists no image")
    missing = [p for p in paths if check_files and not os.path.isfile(p)]
    missing_set = set(missing)
    folders = [(p, n) for p, n in zip(paths, line_of.values()) if p in missing_set and os.path.isdir(p)]
    if folders:
        raise IsADirectoryError(f"{path}:{folders[0][1]}: {folders[0][0]} is a folder; expected an image file "
                                f"(folders: {len(folders)} of the {len(paths)} listed paths)")
    if missing:
        raise FileNotFoundError(f"RegDB image not found: {missing[0]} (listed in {path}; "
                                f"{len(missing)} of {len(paths)} listed images are missing)")
    return paths, np.array(labels, dtype=np.int64)


def _image_list(paths, labels, modality, sort):
    camid = VIS_CAMID if modality == VIS else IR_CAMID
    images = ImageList(list(paths), labels, np.full(len(paths), camid, dtype=np.int64), modality)
    if sort:
        order = sorted(range(len(images)), key=images.paths.__getitem__)
        images = images.subset(np.array(order, dtype=np.int64))
    return images


def _check_disjoint(root, train_name, test_name):
    """Refuse a split whose test index lists a training image (e.g. the same file twice)."""
    train, test = _read_index(root, train_name)[0], _read_index(root, test_name, check_files=False)[0]
    shared = sorted(set(train) & set(test))
    if shared:
        raise ValueError(f"RegDB: {len(shared)} of the {len(test)} images of idx/{test_name} are "
                         f"also in idx/{train_name} (e.g. {os.path.relpath(shared[0], root)}); the "
                         f"training and test splits must be disjoint")


def regdb_train(root, trial):
    """The training split of one RegDB trial (docs/mult.md §1.2).

    root:  folder holding idx/ and the image folders
    trial: int in 1..10
    Returns (vis, ir): ImageLists of N_v and N_r rows (2,060 each on real data) in lexicographic
    order of the path; pids = the index label, camids 1 (visible) and 2 (thermal).
    """
    trial = _check_trial(trial)
    for name in ("visible", "thermal"):
        _check_disjoint(root, f"train_{name}_{trial}.txt", f"test_{name}_{trial}.txt")
    vis = _image_list(*_read_index(root, f"train_visible_{trial}.txt"), VIS, sort=True)
    ir = _image_list(*_read_index(root, f"train_thermal_{trial}.txt"), IR, sort=True)
    return vis, ir


def regdb_test(root, trial, direction="v2t"):
    """Query and gallery of one RegDB trial's test split (docs/mult.md §9), in index-file order.

    direction: "v2t" (query = test visible, gallery = test thermal) or "t2v" (the reverse).
    Nothing is excluded at evaluation; query and gallery are different cameras (1 and 2).
    Returns (query, gallery), 2,060 rows each on real data.
    """
    trial = _check_trial(trial)
    if direction not in ("v2t", "t2v"):
        raise ValueError(f"direction must be 'v2t' (visible to thermal) or 't2v' (thermal to "
                         f"visible), got {direction!r}")
    vis = _image_list(*_read_index(root, f"test_visible_{trial}.txt"), VIS, sort=False)
    ir = _image_list(*_read_index(root, f"test_thermal_{trial}.txt"), IR, sort=False)
    return (vis, ir) if direction == "v2t" else (ir, vis)
