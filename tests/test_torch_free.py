"""The device commands on the core install: `predict`, `bench` and `eval --corruptions` of a bundle with every
package outside the core dependencies (torch, torchvision, timm, sklearn, scipy, matplotlib, ...) made unimportable,
in the command's process and in the bench's worker processes; and the numpy AUC against scikit-learn's."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata

import numpy as np
import pytest
from PIL import Image
from packaging.markers import default_environment
from packaging.requirements import Requirement

from conftest import REPO, make_images, tiny_recipe, write_npz
from edgekd.scoring import accuracy_auc, mid_ranks, rank_auc

BLOCKER = '''
import sys
ALLOWED = set({allowed!r})


class CoreInstallOnly:
    """A meta-path finder that does not find what the core install (pip install .) lacks: `import torch` raises
    ModuleNotFoundError and importlib.util.find_spec('torch') is None, as on a box without it."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in ALLOWED and not top.startswith("_"):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


sys.meta_path[:] = [CoreInstallOnly(f) for f in sys.meta_path]
'''


def core_distributions() -> set[str]:
    """The distributions `pip install .` installs: pyproject's dependencies and theirs, recursively (no extras)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {**default_environment(), "extra": ""}
    todo, seen = [Requirement(d) for d in deps], set()
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.requires(req.name) or []]
    return seen


def core_modules() -> set[str]:
    """Top-level import names allowed on the core install: the standard library, edgekd, the core distributions'."""
    dists = core_distributions()
    names = {top for top, owners in metadata.packages_distributions().items()
             if any(o.lower().replace("_", "-") in dists for o in owners)}
    return names | set(sys.stdlib_module_names) | {"edgekd", "sitecustomize"}


def test_the_core_closure_excludes_the_training_side():
    allowed = core_modules()
    assert {"numpy", "PIL", "onnxruntime", "openvino", "typer", "rich", "yaml"} <= allowed
    assert not {"torch", "torchvision", "timm", "sklearn", "scipy", "matplotlib", "nncf", "pydicom"} & allowed


def test_mid_ranks_and_rank_auc_match_scipy_and_sklearn():
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    ties = rng.integers(0, 5, (6, 40)).astype(float)  # many ties
    assert np.array_equal(mid_ranks(ties), rankdata(ties, axis=1))
    y = rng.integers(0, 2, 40)
    assert rank_auc(y, ties[0]) == pytest.approx(roc_auc_score(y, ties[0]), abs=1e-12)
    assert rank_auc(y, ties[0], positive=0) == pytest.approx(roc_auc_score(1 - y, ties[0]), abs=1e-12)
    y3 = rng.integers(0, 3, 90)
    probs = rng.dirichlet([1, 1, 1], 90)
    got = accuracy_auc(y3, probs)
    assert got["auc"] == pytest.approx(roc_auc_score(y3, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert got["acc"] == pytest.approx((probs.argmax(1) == y3).mean())
    assert np.isnan(accuracy_auc(np.zeros(5, int), rng.dirichlet([1, 1], 5))["auc"])  # one class only
    # an overflowed model's NaN rows: argmax 0 had counted right for class 0, the ranks had given a finite AUC
    nan_rows = np.array([[.9, .1], [.8, .2], [np.nan] * 2, [.3, .7], [.2, .8], [np.nan] * 2])
    got = accuracy_auc(np.array([0, 0, 0, 1, 1, 1]), nan_rows)
    assert np.isnan(got["acc"]) and np.isnan(got["auc"]) and got["nonfinite"] == 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained model exported with the torch side (ONNX + OpenVINO FP32), a labelled folder of its test
    images (PNG, one sub-folder per class) and a sitecustomize dir that blocks everything outside the core."""
    from edgekd.export import export_checkpoint
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    root = tmp_path_factory.mktemp("torchfree")
    npz = write_npz(root / "tiny.npz", n=(64, 16, 24))
    ckpt = train_recipe(recipe_from_dict(tiny_recipe(npz, epochs=3)), root / "run", log=lambda *_: None).best_path
    bundle = root / "bundle"
    export_checkpoint(ckpt, bundle, ["onnx", "openvino"], ["fp32"], log=lambda *_: None)
    names = json.loads((bundle / "edgekd.json").read_text())["class_names"]
    images, labels = make_images(24, 16, 1, seed=2)
    for i, (img, label) in enumerate(zip(images, labels)):
        (root / "data" / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / "data" / names[label] / f"{i}.png")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(allowed=sorted(core_modules())))
    return {"root": root, "bundle": bundle, "data": root / "data", "site": site, "checkpoint": ckpt}


def run_core(exported, *args) -> subprocess.CompletedProcess:
    """`python -m edgekd ARGS` (and the bench's workers, which inherit PYTHONPATH) with the core install only."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{exported['site']}:{REPO}"}
    return subprocess.run([sys.executable, "-m", "edgekd", *map(str, args)], capture_output=True, text=True,
                          cwd=exported["root"], env=env, timeout=600)


def test_the_blocker_blocks(exported):
    proc = run_core(exported, "--version")
    assert proc.returncode == 0, proc.stderr
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(exported["site"])}
    for name in ("torch", "sklearn", "matplotlib", "scipy"):
        p = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)
        assert p.returncode == 1 and f"ModuleNotFoundError: No module named '{name}'" in p.stderr, name


@pytest.mark.slow
def test_predict_bench_and_corruption_eval_run_without_torch(exported):
    bundle, data, root = exported["bundle"], exported["data"], exported["root"]
    proc = run_core(exported, "predict", bundle, data, "--backend", "onnx", "--out", root / "pred.csv")
    assert proc.returncode == 0, proc.stderr
    assert len((root / "pred.csv").read_text().splitlines()) == 1 + 24

    proc = run_core(exported, "bench", bundle, "--data", data, "--precision", "fp32", "--batch", "1,4", "--threads",
                    "1", "--seconds", "0", "--min-runs", "3", "--warmup", "1", "--out", root / "bench")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((root / "bench" / "bench.json").read_text())
    records = summary["records"]
    assert {(r["format"], r["variant"]) for r in records} == {
        ("onnx", "bare"), ("onnx", "runner"), ("openvino", "bare"), ("openvino", "runner")}  # no torch rows
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    for r in records:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] > 0 and r["peak_rss_mb"] > 0
    # FP32 ONNX and OpenVINO, bare and runner, score the 24 labelled images alike (the model learned the task)
    assert len({round(r["acc"], 6) for r in records}) == 1 and records[0]["acc"] > 0.7
    assert summary["gemm"]["library"] == "numpy" and summary["gemm"]["peak_gflops"] > 0
    assert summary["subjects"][0]["test_images"] == 24
    assert not (root / "bench" / "bench.png").exists() and (root / "bench" / "bench.md").is_file()
    # Each row's first call (OpenVINO compiles its shape there) is recorded apart from load_s, and is no faster than
    # the typical call; a second run into the same folder says it replaced the results.
    assert all(r["first_call_ms"] > 0 and r["load_s"] > 0 for r in records)
    ov_bare = [r for r in records if r["format"] == "openvino" and r["variant"] == "bare"]
    assert all(r["first_call_ms"] > r["p50_ms"] for r in ov_bare)
    proc = run_core(exported, "bench", bundle, "--data", data, "--formats", "onnx", "--precision", "fp32", "--batch",
                    "1", "--threads", "1", "--seconds", "0", "--min-runs", "3", "--warmup", "1", "--out", root / "bench")
    assert proc.returncode == 0 and f"replaced the earlier results in {root / 'bench'}" in proc.stderr, proc.stderr

    (root / "ev").mkdir()
    (root / "ev" / "robustness.png").write_bytes(b"an earlier run's chart, written with matplotlib")
    (root / "ev" / "metrics.json").write_text('{"best_epoch": 1}')  # a training run's: a bundle's corruption eval
    # writes no metrics.json, so it is not refused for one (as an eval of a checkpoint is)
    proc = run_core(exported, "eval", bundle, "--corruptions", "--data", data, "--only", "gaussian_noise,contrast",
                    "--severities", "1,5", "--out", root / "ev")
    assert proc.returncode == 0, proc.stderr
    rob = json.loads((root / "ev" / "robustness.json").read_text())
    assert rob["images"] == 24 and rob["class_counts"] == [12, 12]
    assert {(r["format"], r["corruption"]) for r in rob["records"]} == {
        (f, c) for f in ("onnx", "openvino") for c in ("clean", "gaussian_noise", "contrast")}
    clean = [r["acc"] for r in rob["records"] if r["corruption"] == "clean"]
    assert clean == [records[0]["acc"]] * 2  # the bench scored the same images alike
    assert (root / "ev" / "robustness.md").is_file() and not (root / "ev" / "robustness.png").exists()
    assert (root / "ev" / "metrics.json").read_text() == '{"best_epoch": 1}'
    proc = run_core(exported, "eval", bundle, "--corruptions", "--failures", "--data", data, "--out", root / "e3")
    assert proc.returncode == 2 and "train" in proc.stderr and not (root / "e3").exists()  # asked first, not after
    assert "corruption eval:" not in proc.stderr, proc.stderr
    proc = run_core(exported, "eval", bundle, "--corruptions", "--data", data, "--split", "val", "--out", root / "e2")
    assert proc.returncode == 2 and "a labelled folder" in proc.stderr and "has no splits" in proc.stderr  # ignored


def test_a_training_side_command_is_a_one_line_error_without_torch(exported):
    proc = run_core(exported, "eval", exported["checkpoint"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "pip install 'edgekd[train]'" in proc.stderr
    proc = run_core(exported, "eval", exported["bundle"], "--corruptions")  # no labelled data
    assert proc.returncode == 2 and "--data DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_corruptions_without_torch_are_the_pixels_the_training_side_sees(exported, tmp_path):
    """One numpy/Pillow implementation serves both sides: the core install corrupts bit for bit alike."""
    from edgekd.robustness.corruptions import CORRUPTIONS, corrupt

    image = make_images(1, 24, 3, seed=5)[0][0]
    np.save(tmp_path / "image.npy", image)
    code = ("import sys, numpy as np; from edgekd.robustness.corruptions import CORRUPTIONS, corrupt; "
            f"img = np.load({str(tmp_path / 'image.npy')!r}); "
            f"np.savez({str(tmp_path / 'out.npz')!r}, **{{n: corrupt(img, n, 3, seed=1, index=2) for n in CORRUPTIONS}}); "
            "assert 'torch' not in sys.modules and 'scipy' not in sys.modules")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{exported['site']}:{REPO}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    blocked = np.load(tmp_path / "out.npz")
    for name in CORRUPTIONS:
        assert np.array_equal(blocked[name], corrupt(image, name, 3, seed=1, index=2)), name


def test_a_missing_package_names_the_extra_that_installs_it():
    """The serve, dicom and skin extras are named for their own packages (installing `train` would not fix a missing
    fastapi), and a module missing from an installed package is a version too old, not a package to install."""
    from edgekd.cli.process import missing_package

    assert "pip install 'edgekd[serve]'" in missing_package("fastapi")
    assert "pip install 'edgekd[dicom]'" in missing_package("pydicom")
    assert "pip install 'edgekd[skin]'" in missing_package("cv2")
    assert "pip install 'edgekd[train]'" in missing_package("a_package_nobody_has")
    line = missing_package("numpy.opset13_nowhere")  # numpy is installed: its missing submodule is a version issue
    assert "too old" in line and "'numpy.opset13_nowhere'" in line and "edgekd[" not in line
    assert "pip install -U 'scikit-learn'" in missing_package("sklearn.not_a_module")  # the pip name, not 'sklearn'
