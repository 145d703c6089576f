"""The datasets by name: where each lives by default, its training set and its test protocol's image lists.

    vis, ir = training_set("sysu", "datasets/SYSU-MM01")                # ImageLists, rows sorted by path
    tests = test_sets("regdb", "datasets/RegDB", trial=3)               # {setting: (query, gallery)}
    images = test_images("sysu", "datasets/SYSU-MM01")                 # every test image an evaluation reads

"synthetic" is the demo's SYSU-MM01-layout set, which demo/synthetic.py renders (train.py does on first use); a
folder holding a rendered set (its SYNTHETIC_META file) is checked against the counts it recorded, a real dataset
against the official counts (SYSU-MM01, LLCM; `allow_count_mismatch` accepts others).
"""
import json
import os

ROOTS = {"sysu": "datasets/SYSU-MM01", "regdb": "datasets/RegDB", "llcm": "datasets/LLCM",
         "synthetic": "datasets/synthetic"}   # the default --data-root of train.py and evaluate.py
SYNTHETIC_META = "synthetic.json"             # what demo/synthetic.py writes last into a folder it renders


def training_set(dataset, root, trial=None, allow_count_mismatch=False):
    """(vis, ir) ImageLists of the training split."""
    if dataset == "regdb":
        from .regdb import regdb_train
        return regdb_train(root, trial)
    layout = "llcm" if dataset == "llcm" else "sysu"
    meta = synthetic_meta(root, dataset)
    if layout == "llcm":
        from .llcm import LLCM_TRAIN_COUNTS as official, llcm_train as read
    else:
        from .sysu import SYSU_TRAIN_COUNTS as official, sysu_train as read
    expected = meta["train_counts"] if meta else official
    return read(root, expected=None if allow_count_mismatch else expected)


def test_sets(dataset, root, trial=None, trials=10):
    """{setting name: (query, gallery) ImageLists} of the test protocol: RegDB both directions of split `trial`;
    SYSU-MM01 (and the synthetic set) all- and indoor-search, LLCM IR->VIS and VIS->IR, each for gallery draws
    0..trials-1."""
    if dataset == "regdb":
        from .regdb import regdb_test
        return {d: regdb_test(root, trial, direction=d) for d in ("v2t", "t2v")}
    if dataset == "llcm":
        from .llcm import llcm_test
        return {f"{d} trial {t}": llcm_test(root, direction=d, trial=t) for d in ("i2v", "v2i") for t in range(trials)}
    from .sysu import sysu_test
    return {f"{mode} trial {t}": sysu_test(root, mode=mode, trial=t) for mode in ("all", "indoor")
            for t in range(trials)}


def test_images(dataset, root, trial=None):
    """Every test image an evaluation can read, as evaluate.py's protocols extract them -> [ImageList]: SYSU-MM01
    (and the synthetic set) the queries and every all-search gallery candidate (not only those a trial draws;
    indoor's are among them), RegDB the split's test visible and thermal images, LLCM every visible and every
    infrared test image."""
    if dataset == "regdb":
        from .regdb import regdb_test
        return list(regdb_test(root, trial, direction="v2t"))
    if dataset == "llcm":
        from .llcm import llcm_gallery_candidates
        return [llcm_gallery_candidates(root, d) for d in ("i2v", "v2i")]
    from .sysu import sysu_gallery_candidates, sysu_test
    return [sysu_test(root, mode="all", trial=0)[0], sysu_gallery_candidates(root, "all")]


def synthetic_meta(root, dataset):
    """The SYNTHETIC_META of a set demo/synthetic.py rendered in `root` (its arguments and counts), or None; a set of
    another layout than `dataset` reads is refused."""
    layout = {"regdb": "regdb", "llcm": "llcm"}.get(dataset, "sysu")
    path = os.path.join(root, SYNTHETIC_META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if meta.get("layout") != layout:
        raise ValueError(f"{path}: a synthetic set in the {meta.get('layout')!r} layout; "
                         f"--dataset {dataset} reads the {layout} layout")
    return meta
