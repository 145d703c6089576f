"""metrics.py copied alone into an empty folder: its metrics, distance and re-ranking import and run
without the rest of the repository and without tqdm or Pillow, and give the repository's numbers."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every top-level module of the project but metrics, found on disk and named (in case one is added)
PROJECT = ({os.path.splitext(n)[0] for n in os.listdir(REPO) if n.endswith(".py")}
           | {n for n in os.listdir(REPO) if os.path.isdir(os.path.join(REPO, n)) and not n.startswith(".")}
           | {"clustering", "mult", "memory", "model", "train", "evaluate", "features", "plumbing", "data", "demo",
              "bench", "tests", "conftest"}) - {"metrics"}
REFUSED = sorted(PROJECT | {"tqdm", "PIL"})

SCRIPT = r'''
import importlib.abc, json, os, sys
REFUSED, REPO = set(sys.argv[1].split(",")), os.path.realpath(sys.argv[2])


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ImportError(f"refused: {name}")
        return None


sys.meta_path.insert(0, Refuse())
assert not any(os.path.realpath(p or ".") == REPO for p in sys.path), sys.path
import numpy as np
import metrics
assert os.path.dirname(os.path.realpath(metrics.__file__)) == os.path.realpath(os.getcwd()), metrics.__file__
case = {k: np.array(v) for k, v in json.load(open("case.json")).items()}
out = {}
for name, got in (
        ("sysu", metrics.eval_sysu(case["d"], case["qp"], case["gp"], case["qc_sysu"], case["gc_sysu"],
                                   return_valid=True)),
        ("regdb", metrics.eval_regdb(case["d"], case["qp"], case["gp"], max_rank=5, return_valid=True)),
        ("llcm", metrics.eval_llcm(case["d"], case["qp"], case["gp"], case["qc_llcm"], case["gc_llcm"],
                                   return_valid=True))):
    cmc, m_ap, m_inp, n_valid = got
    assert cmc.shape == ((5,) if name == "regdb" else (20,)) and cmc.dtype == np.float64
    assert (np.diff(cmc) >= 0).all() and 0 <= cmc[0] and cmc[-1] <= 1
    assert 0 < m_ap <= 1 and 0 < m_inp <= 1 and 0 < n_valid <= len(case["qp"])
    out[name] = [cmc.tolist(), m_ap, m_inp, n_valid]
qg = metrics.pairwise_distance(case["q"], case["g"])
qq, gg = metrics.pairwise_distance(case["q"], case["q"]), metrics.pairwise_distance(case["g"], case["g"])
final = metrics.re_ranking(qg, (qq + qq.T) / 2, (gg + gg.T) / 2, k1=6, k2=3)
assert qg.shape == final.shape == (len(case["q"]), len(case["g"])) and np.isfinite(final).all()
assert (final >= 0).all() and (final <= 1 + 1e-9).all()
out["pairwise"], out["rerank"] = qg.tolist(), final.tolist()
assert not {m.partition(".")[0] for m in sys.modules} & REFUSED
print(json.dumps(out))
'''


def make_case():
    rng = np.random.default_rng(0)
    num_q, num_g = 30, 40
    x = rng.standard_normal((num_q + num_g, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return {"d": rng.integers(0, 6, (num_q, num_g)).astype(float), "qp": rng.integers(0, 10, num_q),
            "gp": rng.integers(0, 8, num_g), "qc_sysu": rng.choice([3, 6], num_q),
            "gc_sysu": rng.choice([1, 2, 4, 5], num_g), "qc_llcm": rng.integers(1, 4, num_q),
            "gc_llcm": rng.integers(1, 4, num_g), "q": x[:num_q], "g": x[num_q:]}


def test_metrics_alone_in_an_empty_folder(tmp_path):
    shutil.copy(os.path.join(REPO, "metrics.py"), tmp_path / "metrics.py")
    case = make_case()
    (tmp_path / "case.json").write_text(json.dumps({k: v.tolist() for k, v in case.items()}))
    (tmp_path / "check.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "check.py", ",".join(REFUSED), REPO], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    # the copy computes what the repository's metrics.py computes
    want = {"sysu": metrics.eval_sysu(case["d"], case["qp"], case["gp"], case["qc_sysu"], case["gc_sysu"],
                                      return_valid=True),
            "regdb": metrics.eval_regdb(case["d"], case["qp"], case["gp"], max_rank=5, return_valid=True),
            "llcm": metrics.eval_llcm(case["d"], case["qp"], case["gp"], case["qc_llcm"], case["gc_llcm"],
                                      return_valid=True)}
    for name, (cmc, m_ap, m_inp, n_valid) in want.items():
        assert got[name] == [cmc.tolist(), m_ap, m_inp, n_valid]
    qg = metrics.pairwise_distance(case["q"], case["g"])
    qq, gg = metrics.pairwise_distance(case["q"], case["q"]), metrics.pairwise_distance(case["g"], case["g"])
    np.testing.assert_array_equal(got["pairwise"], qg)
    np.testing.assert_array_equal(got["rerank"], metrics.re_ranking(qg, (qq + qq.T) / 2, (gg + gg.T) / 2, k1=6, k2=3))
