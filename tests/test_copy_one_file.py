"""Each stage file works when copied ALONE into another codebase: it imports torch, numpy, scipy and the standard
library only (model.py: torchvision's ResNets too), never another file of this project.

clustering.py, mult.py, memory.py and model.py are each copied into an empty folder of their own; one child
Python process (sys.executable, so torch is imported once) puts only that folder on sys.path, never
the repository, installs an import hook (a sys.meta_path finder) that refuses every top-level module
of this project other than the copied one, imports the copy and runs its main functions on small
inputs, checking the shapes of what they return. The child prints one JSON line per case: "ok" or
the traceback. A last case, a stand-in memory.py that imports clustering, shows that the hook bites.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("clustering", "mult", "memory", "model")
PROJECT = ("clustering", "mult", "memory", "model", "train", "evaluate", "metrics", "features", "plumbing",
           "data", "demo", "bench")

CHILD = r'''
import importlib, importlib.abc, json, os, sys, traceback
import numpy as np, scipy.sparse as sp, torch

repo, project, cases = sys.argv[1], set(json.loads(sys.argv[2])), json.loads(sys.argv[3])
base = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != repo]


class Refuse(importlib.abc.MetaPathFinder):
    """Refuses every top-level module of the project except `allowed`."""
    allowed = None

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in project and top != self.allowed:
            raise ImportError(f"{self.allowed}.py imported {name!r}, a module of this project")
        return None


def features(n, d, groups, gen, spread=0.1):
    centers = torch.nn.functional.normalize(torch.randn(groups, d, generator=gen), dim=1)
    x = centers[torch.arange(n) % groups] + spread * torch.randn(n, d, generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


def run_clustering(m, gen):
    x = features(60, 8, 4, gen)
    s = m.jaccard_similarity(x, k1=10, k2=3)
    assert isinstance(s, sp.csr_matrix) and s.shape == (60, 60)
    labels = m.dbscan(s, eps=0.6, min_samples=4)
    assert labels.shape == (60,) and labels.dtype == np.int64 and labels.max() >= 0
    assert m.cluster_centers(x, labels).shape == (labels.max() + 1, 8)
    aware = m.jaccard_similarity(x, k1=10, k2=3, modality=np.arange(60) % 2)
    assert aware.shape == (60, 60)


def run_mult(m, gen):
    fv, fr = features(30, 8, 3, gen), features(20, 8, 3, gen)
    lv, lr = np.arange(30) % 3, np.arange(20) % 3
    lv[0] = -1
    sims = []
    for f in (fv, fr):
        s = np.clip(f.numpy() @ f.numpy().T, 0, 1)
        np.fill_diagonal(s, 1.0)
        sims.append(sp.csr_matrix(s))
    out = m.label_transfer(fv, fr, lv, lr, *sims)
    assert out.labels_v.shape == (30,) and out.labels_r.shape == (20,)
    assert out.cross_v.shape == (30,) and out.cross_r.shape == (20,)
    assert out.soft_v.shape == (30, 3) and out.soft_cross_r.shape == (20, 3)
    assert out.mixed(0.7).soft_r.shape == (20, 3)
    for method in ("ot", "pgm"):
        assert m.associate(method, fv, fr, lv, lr).soft_cross_v.shape == (30, 3)


def run_memory(m, gen):
    banks = {"vis": m.ClusterMemory(torch.randn(5, 8, generator=gen)),
             "ir": m.ClusterMemory(torch.randn(4, 8, generator=gen))}
    f_v0, f_v1, f_r = (torch.randn(b, 8, generator=gen, requires_grad=True) for b in (6, 6, 7))
    y_v, y_r = torch.arange(6) % 5, torch.arange(7) % 4
    loss, updates = m.stage_one_loss(banks, f_v0, f_v1, f_r, y_v, y_r)
    assert loss.shape == () and len(updates) == 3
    loss.backward()
    m.apply_updates(banks, updates)
    assert banks["vis"].bank.shape == (5, 8) and banks["ir"].bank.shape == (4, 8)
    feats, labels = torch.randn(12, 8, generator=gen), torch.arange(12) % 3
    centers, proto_labels, proto_index = m.split_prototypes(feats, labels, torch.arange(12) % 2)
    memory = m.HybridMemory(centers)
    assert m.global_loss(memory, feats, labels, proto_labels).shape == ()
    memory.update(feats, proto_index)
    assert memory.hard.shape == centers.shape == (6, 8)


def run_model(m, gen):
    torch.manual_seed(0)
    net = m.TwoStreamNet("resnet18").train()
    f = net(torch.randn(2, 3, 32, 16, generator=gen), torch.randn(3, 3, 32, 16, generator=gen))
    assert f.shape == (5, 512)
    net.eval()
    with torch.no_grad():
        g = net.modality_fn()(torch.randn(2, 3, 32, 16, generator=gen), 1)
    assert g.shape == (2, 512) and torch.allclose(g.norm(dim=1), torch.ones(2))


hook = Refuse()
sys.meta_path.insert(0, hook)
for case, name, folder in cases:                # case: the report key and the run_<case> to call
    sys.path[:] = [folder] + base
    hook.allowed = name
    try:
        module = importlib.import_module(name)
        assert os.path.dirname(os.path.abspath(module.__file__)) == folder, module.__file__
        globals()["run_" + case](module, torch.Generator().manual_seed(0))
        print(json.dumps({case: "ok"}), flush=True)
    except BaseException:
        print(json.dumps({case: traceback.format_exc()}), flush=True)
    finally:
        sys.modules.pop(name, None)
'''


@pytest.fixture(scope="module")
def child_results(tmp_path_factory):
    """Runs the one child process; returns {case: "ok" or its traceback}."""
    cases = []
    for name in STAGES:
        folder = tmp_path_factory.mktemp(f"copy_{name}")
        shutil.copy(os.path.join(REPO, f"{name}.py"), folder)
        assert os.listdir(folder) == [f"{name}.py"]
        cases.append((name, name, str(folder)))
    fake = tmp_path_factory.mktemp("sibling_import")
    (fake / "memory.py").write_text("import clustering\n")
    cases.append(("sibling_import", "memory", str(fake)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", CHILD, REPO, json.dumps(PROJECT), json.dumps(cases)],
                          cwd=str(tmp_path_factory.mktemp("cwd")), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = {}
    for line in proc.stdout.splitlines():
        results.update(json.loads(line))
    return results


@pytest.mark.parametrize("name", STAGES)
def test_stage_file_runs_alone(child_results, name):
    assert child_results.get(name) == "ok", child_results.get(name, "no report from the child")


def test_hook_refuses_other_project_modules(child_results):
    """The stand-in memory.py that imports clustering fails in the child: the hook is effective."""
    report = child_results.get("sibling_import", "")
    assert "ImportError" in report and "imported 'clustering', a module of this project" in report
