"""Serving-engine repositories (Triton, OpenVINO Model Server) from an exported bundle: config.pbtxt read with
Triton's own model-config protobuf and compared with the ONNX graph (onnx), model files = the manifest's sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgekd.errors import EdgeKDError
from edgekd.export import export_checkpoint, profile_from_dict
from edgekd.runtime.repository import write_repository
from test_export import make_checkpoint, quiet


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    ckpt = make_checkpoint(root, "edgekd_cnn_tiny")
    profile = profile_from_dict({"parity": {"images": 4}, "threads": 1})
    export_checkpoint(ckpt, root / "bundle", ["onnx", "openvino"], ["fp32"], profile, log=quiet)
    return root / "bundle"


def manifest(bundle: Path) -> dict[str, str]:
    return {path: digest for digest, path in
            (line.split("  ", 1) for line in (bundle / "manifest.sha256").read_text().splitlines())}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_triton_config_parses_with_tritons_protobuf_and_matches_the_onnx_graph(bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    repo = write_repository(bundle, "triton", tmp_path / "triton", max_batch_size=16, queue_delay_us=500)
    name = repo.model_name
    config = text_format.Parse((tmp_path / "triton" / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["intra_op_thread_count"].string_value == "1"

    graph = onnx.load(str(tmp_path / "triton" / name / "1" / "model.onnx")).graph
    initializers = {i.name for i in graph.initializer}
    for declared, tensors in ((config.input, [t for t in graph.input if t.name not in initializers]),
                              (config.output, graph.output)):
        assert [t.name for t in declared] == [t.name for t in tensors]
        for d, t in zip(declared, tensors):
            shape = t.type.tensor_type.shape.dim
            assert shape[0].dim_param and not shape[0].dim_value  # the dynamic batch axis Triton adds
            assert list(d.dims) == [x.dim_value if x.dim_value else -1 for x in shape[1:]]
            onnx_type = onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type)  # FLOAT
            assert model_config_pb2.DataType.Name(d.data_type) == {"FLOAT": "TYPE_FP32"}[onnx_type]
    assert list(config.input[0].dims) == [3, 16, 16] and list(config.output[0].dims) == [2]

    listed = manifest(bundle)
    assert repo.files == {f"{name}/1/model.onnx": listed["onnx/model_fp32.onnx"]}
    assert sha256(tmp_path / "triton" / name / "1" / "model.onnx") == listed["onnx/model_fp32.onnx"]
    readme = (tmp_path / "triton" / "README.md").read_text()
    meta = json.loads((bundle / "edgekd.json").read_text())
    assert str(meta["preprocess"]["mean"]) in readme and str(meta["preprocess"]["std"]) in readme
    assert f"center-crop {meta['preprocess']['center_crop']}x" in readme and "halves rounded to even" in readme


def test_ovms_repository_holds_the_bundles_ir_and_lists_it_with_base_path(bundle, tmp_path):
    repo = write_repository(bundle, "ovms", tmp_path / "ovms", name="chest", base_path="/srv/models/")
    config = json.loads((tmp_path / "ovms" / "config.json").read_text())
    assert config["model_config_list"] == [{"config": {
        "name": "chest", "base_path": "/srv/models/chest", "target_device": "CPU",
        "plugin_config": {"INFERENCE_PRECISION_HINT": "f32"}}}]
    listed = manifest(bundle)
    for suffix in ("xml", "bin"):
        path = tmp_path / "ovms" / "chest" / "1" / f"model.{suffix}"
        assert sha256(path) == listed[f"openvino/model_fp32.{suffix}"] == repo.files[f"chest/1/model.{suffix}"]
    assert "PrePostProcessor" in (tmp_path / "ovms" / "README.md").read_text()
    # An update of a served model: the same name, the next version folder.
    repo = write_repository(bundle, "ovms", tmp_path / "v2", name="chest", version=2)
    assert set(repo.files) == {"chest/2/model.xml", "chest/2/model.bin"} and (tmp_path / "v2" / "chest" / "2").is_dir()


def test_the_readme_preprocessing_done_by_hand_matches_the_runtime(bundle, tmp_path):
    """A client following the README's steps (Pillow's bilinear resize of the shorter side, the longer rounded down,
    centre crop, scale, mean, std) gets the runtime's input tensor; OpenCV-style bilinear without antialiasing (what
    'bilinear' alone let a client pick) does not."""
    import numpy as np
    from PIL import Image

    from edgekd.runtime import Preprocessor, open_bundle

    pre = open_bundle(bundle).preprocess
    write_repository(bundle, "triton", tmp_path / "t")
    readme = (tmp_path / "t" / "README.md").read_text()
    assert "Image.Resampling.BILINEAR" in readme and "rounded down" in readme and "min..max" in readme
    c, h, w = pre["input_size"]
    assert c == 3  # an RGB model: no gray conversion in the steps below
    size = pre["resize"]
    img = np.random.default_rng(0).integers(0, 256, (90, 61, 3), dtype=np.uint8)  # taller than wide, odd width
    new_w, new_h = size, int(size * 90 / 61)
    for resample, same in ((Image.Resampling.BILINEAR, True), (None, False)):
        if resample is None:  # no antialiasing: sample the 4 nearest pixels of each output pixel's centre only
            ys, xs = ((np.arange(n) + 0.5) * (m / n) - 0.5 for n, m in ((new_h, 90), (new_w, 61)))
            ys, xs = np.clip(ys, 0, 89), np.clip(xs, 0, 60)
            y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
            y1, x1 = np.minimum(y0 + 1, 89), np.minimum(x0 + 1, 60)
            fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
            f = img.astype(np.float64)
            resized = np.round((f[y0][:, x0] * (1 - fx) + f[y0][:, x1] * fx) * (1 - fy)
                               + (f[y1][:, x0] * (1 - fx) + f[y1][:, x1] * fx) * fy).astype(np.uint8)
        else:
            resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), resample))
        top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))
        crop = resized[top:top + h, left:left + w].astype(np.float32)
        x = ((crop * np.float32(pre["scale"]) - np.asarray(pre["mean"], np.float32))
             / np.asarray(pre["std"], np.float32)).transpose(2, 0, 1)
        runtime = Preprocessor(pre)(img)
        assert np.allclose(x, runtime[0] if runtime.ndim == 4 else runtime, atol=1e-6) == same, resample


def test_the_card_carries_the_same_preprocessing_steps_and_the_tta_views(bundle, tmp_path):
    """The card described resize, crop and normalization only: not the decode (EXIF orientation, 16-bit scaling,
    DICOM windows) nor how the TTA views are made, which code feeding the model itself must repeat."""
    from edgekd.runtime import open_bundle, preprocessing_steps

    b = open_bundle(bundle)
    card = (bundle / "card.md").read_text()
    section = card.split("## Preprocessing, step by step", 1)[1]
    assert all(step in section for step in preprocessing_steps(b.preprocess))  # the repository README's own words
    assert "EXIF orientation" in section and "min..max" in section and "high byte" in section
    tta = b.tta
    assert f"its central {tta['center_crop_fraction']:.4g} resized back" in section
    assert all(f"{v}: " in section for v in tta["views"]) and "rounded back to uint8" in section


def test_a_changed_artifact_is_refused_and_nothing_is_written(bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    onnx_file = copy / "onnx" / "model_fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(EdgeKDError, match="model_fp32.onnx"):
        write_repository(copy, "triton", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "torchserve"}, "unknown repository kind"),
    ({"kind": "triton", "precision": "int8"}, "no int8 model in the bundle"),
    ({"kind": "ovms", "name": "../up"}, "--name"),
    ({"kind": "ovms", "base_path": ""}, "--base-path ''"),  # mounted $PWD over the container's /
    ({"kind": "ovms", "base_path": "models"}, "--base-path 'models'"),  # `-v $PWD:models` is not a docker mount
    ({"kind": "ovms", "base_path": "/models/../"}, "without '..'"),  # base_path /models/../x is /x
    ({"kind": "ovms", "base_path": "/my models; touch x"}, "letters, digits"),  # pasted into the README's command
    ({"kind": "triton", "version": 0}, "--version"),
    ({"kind": "triton", "precision": "fp64"}, "unknown precision 'fp64' \\(use fp32, fp16, int8\\)"),  # 'no onnx fp64'
])
def test_bad_requests_are_one_line_errors(bundle, tmp_path, kwargs, message):
    with pytest.raises(EdgeKDError, match=message) as err:
        write_repository(bundle, out=tmp_path / "repo", **kwargs)
    assert "\n" not in str(err.value) and not (tmp_path / "repo").exists()


def run_cli(monkeypatch, *args: str) -> int:
    """`edgekd ARGS` in-process: its exit code (0 when it returns)."""
    import sys

    from edgekd.cli import run

    monkeypatch.setattr(sys, "argv", ["edgekd", *args])
    try:
        run()
    except SystemExit as ex:
        return ex.code or 0
    return 0


def test_cli_refuses_a_non_empty_out_and_writes_a_new_one(bundle, tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert run_cli(monkeypatch, "repository", str(bundle), "--kind", "triton", "--out", str(tmp_path / "taken")) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"
    assert run_cli(monkeypatch, "repository", str(bundle), "--kind", "ovms", "--out", str(tmp_path / "new")) == 0
    assert (tmp_path / "new" / "config.json").is_file()
    assert "model.bin  sha256" in capsys.readouterr().out
    # a folder that is no bundle is named so (it said --out 'is inside the input')
    assert run_cli(monkeypatch, "repository", str(tmp_path), "--kind", "ovms", "--out", str(tmp_path / "r2")) == 2
    assert "is inside the input" not in (err := capsys.readouterr().err) and "bundle" in err, err
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("kind, option, value", [("ovms", "--max-batch", "5000"), ("ovms", "--queue-delay-us", "10"),
                                                  ("triton", "--base-path", "/srv")])
def test_an_option_of_the_other_server_is_refused_not_ignored(bundle, tmp_path, monkeypatch, capsys, kind, option,
                                                              value):
    """`--kind ovms --max-batch 5000` had written a repository without a word of the option it ignored."""
    out = tmp_path / "r"
    assert run_cli(monkeypatch, "repository", str(bundle), "--kind", kind, "--out", str(out), option, value) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{option}: an option of --kind" in err and f"not of --kind {kind}" in err
    assert not out.exists()
    key = {"--max-batch": "max_batch_size", "--queue-delay-us": "queue_delay_us", "--base-path": "base_path"}[option]
    with pytest.raises(EdgeKDError, match=f"^{option}: an option of --kind"):  # the Python API had ignored it
        write_repository(bundle, kind, out, **{key: value if key == "base_path" else int(value)})
    assert not out.exists()


def test_an_edited_edgekd_json_is_refused_as_the_runtime_refuses_it(bundle, tmp_path):
    """The README it writes tells clients the preprocessing and classes: from an edgekd.json edited after export
    (its manifest line re-hashed) it had published another normalization and three classes for a 2-output model."""
    import shutil

    from edgekd.export.bundle import write_manifest

    for key, change in (("class_names", lambda m: m["class_names"].__setitem__(0, "renamed")),
                        ("preprocess", lambda m: m["preprocess"].update(mean=[0.2] * len(m["preprocess"]["mean"])))):
        copy = tmp_path / key
        shutil.copytree(bundle, copy)
        meta = json.loads((copy / "edgekd.json").read_text())
        change(meta)
        (copy / "edgekd.json").write_text(json.dumps(meta))
        write_manifest(copy)
        for kind in ("triton", "ovms"):
            with pytest.raises(EdgeKDError, match=f"edgekd.json {key}.* the model file was exported with"):
                write_repository(copy, kind, tmp_path / f"repo-{key}-{kind}")
            assert not (tmp_path / f"repo-{key}-{kind}").exists()


def test_the_readmes_docker_line_quotes_the_working_folder(bundle, tmp_path):
    for kind in ("triton", "ovms"):  # a repository under a folder with a space had broken the pasted command
        write_repository(bundle, kind, tmp_path / f"my repo {kind}")
        readme = (tmp_path / f"my repo {kind}" / "README.md").read_text()
        assert '-v "$PWD":/models' in readme and "# from inside this folder (the repository)" in readme


def test_out_as_a_symlink_to_an_empty_folder_is_followed(bundle, tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    write_repository(bundle, "ovms", tmp_path / "link")
    assert (tmp_path / "target" / "config.json").is_file() and (tmp_path / "link").is_symlink()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(EdgeKDError, match="--out .*dangling: a symlink to .*nowhere, which is not a folder"):
        write_repository(bundle, "ovms", tmp_path / "dangling")


def test_an_empty_mounted_volume_as_out_is_filled_in_place(bundle, tmp_path, monkeypatch):
    """`docker run -v ./repo:/out ... --out /out`: the repository was staged beside the mount point, which then had to
    be removed (EBUSY) and renamed over (EXDEV); a parent it may not write failed naming the staging folder. Such an
    --out is staged inside and its entries moved in (config.json last); nothing else is left there."""
    import os as os_

    import edgekd.runtime.repository as repository

    volume = tmp_path / "volume"
    volume.mkdir()
    monkeypatch.setattr(repository.os.path, "ismount", lambda p: os_.fspath(p) == os_.fspath(volume))
    real_rmdir = Path.rmdir

    def busy(path):  # what a mount point answers
        if path == volume:
            raise OSError(16, "Device or resource busy", str(path))
        real_rmdir(path)

    monkeypatch.setattr(Path, "rmdir", busy)
    moved: list[str] = []
    real_rename = repository.os.rename
    monkeypatch.setattr(repository.os, "rename", lambda a, b: moved.append(Path(b).name) or real_rename(a, b))
    repo = write_repository(bundle, "ovms", volume, name="chest")
    assert sorted(p.name for p in volume.iterdir()) == ["README.md", "chest", "config.json", "edgekd-clients.json"]
    assert moved[-1] == "config.json" and sha256(volume / "chest" / "1" / "model.xml") == repo.files["chest/1/model.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]  # nothing staged beside it
    assert not repository.stages_inside(tmp_path / "new") and not repository.stages_inside(tmp_path)


def test_add_into_a_mount_on_the_same_device_is_staged_inside(bundle, tmp_path, monkeypatch):
    """`--add` compared devices only: into a bind mount of one filesystem it staged beside the mount point, and
    Linux refuses a rename across mount points (EXDEV) even on one device."""
    import os as os_

    import edgekd.runtime.repository as repository

    volume = tmp_path / "volume"
    write_repository(bundle, "ovms", volume, name="chest")
    monkeypatch.setattr(repository.os.path, "ismount", lambda p: os_.fspath(p) == os_.fspath(volume))
    real_rename = repository.os.rename

    def no_cross_mount(a, b):
        if (volume in Path(a).parents) != (volume in Path(b).parents):  # one side in the mount, one outside
            raise OSError(18, "Invalid cross-device link", str(a))
        real_rename(a, b)

    monkeypatch.setattr(repository.os, "rename", no_cross_mount)
    write_repository(bundle, "ovms", volume, name="chest2", add=True)
    assert (volume / "chest2" / "1" / "model.xml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]  # nothing staged beside it
    assert not any(p.name.startswith(".edgekd-add.") for p in volume.iterdir())


def test_precision_in_any_case_and_a_file_as_out(bundle, tmp_path):
    repo = write_repository(bundle, "triton", tmp_path / "t", precision="FP32")
    assert list(repo.files) == [f"{repo.model_name}/1/model.onnx"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EdgeKDError, match="a file, not a directory"):  # it said "exists and is not empty"
        write_repository(bundle, "triton", tmp_path / "afile")


def test_an_updated_bundle_is_not_named_like_its_parent_by_default(bundle, tmp_path):
    """`edgekd update` makes a bundle with other outputs; its default serving name was the parent's, so "same name,
    next version" would have swapped a 2-class model for a 12-output one."""
    import shutil

    from edgekd.export.bundle import write_manifest

    child = tmp_path / "child"
    shutil.copytree(bundle, child)
    meta = json.loads((child / "edgekd.json").read_text())
    meta["lineage"] = {"parent_bundle_sha256": "0" * 64}
    (child / "edgekd.json").write_text(json.dumps(meta))
    write_manifest(child)
    parent_name = write_repository(bundle, "triton", tmp_path / "p").model_name
    child_name = write_repository(child, "triton", tmp_path / "c").model_name
    assert child_name != parent_name and child_name == parent_name.replace("_fp32", f"_{len(meta['class_names'])}out_fp32")


def test_add_puts_a_second_model_or_the_next_version_into_a_served_repository(bundle, tmp_path, monkeypatch):
    """A second model could not join a repository (a non-empty --out was refused), and the README's advice to copy
    its folder in left OpenVINO Model Server never loading it: config.json did not list it. --add lists it."""
    write_repository(bundle, "ovms", tmp_path / "o", name="chest")
    repo = write_repository(bundle, "ovms", tmp_path / "o", name="chest2", add=True)
    config = json.loads((tmp_path / "o" / "config.json").read_text())["model_config_list"]
    assert [c["config"]["name"] for c in config] == ["chest", "chest2"]
    assert config[1]["config"]["base_path"] == "/models/chest2"
    assert sha256(tmp_path / "o" / "chest2" / "1" / "model.bin") == repo.files["chest2/1/model.bin"]
    assert "--add --name chest2" in (tmp_path / "o" / "README-chest2.md").read_text()
    write_repository(bundle, "ovms", tmp_path / "o", name="chest", version=2, add=True)  # the next version
    assert (tmp_path / "o" / "chest" / "2" / "model.xml").is_file()
    assert len(json.loads((tmp_path / "o" / "config.json").read_text())["model_config_list"]) == 2  # listed once
    with pytest.raises(EdgeKDError, match="model 'chest' has a version 2 already; give the next --version"):
        write_repository(bundle, "ovms", tmp_path / "o", name="chest", version=2, add=True)
    with pytest.raises(EdgeKDError, match=r"--base-path /srv: config.json serves 'chest' from /models/chest"):
        write_repository(bundle, "ovms", tmp_path / "o", name="chest", version=3, base_path="/srv", add=True)
    with pytest.raises(EdgeKDError, match=r"--base-path /srv: config.json's models are under /models, where the "
                                          r"repository is mounted"):  # one mount cannot serve both
        write_repository(bundle, "ovms", tmp_path / "o", name="other", base_path="/srv", add=True)

    write_repository(bundle, "triton", tmp_path / "t", name="a")
    write_repository(bundle, "triton", tmp_path / "t", name="b", add=True)
    same = write_repository(bundle, "triton", tmp_path / "t", name="a", version=2, add=True)
    assert not any("config.pbtxt stays" in n for n in same.notes)  # the same options: nothing to say
    assert sorted(p.relative_to(tmp_path / "t").as_posix() for p in (tmp_path / "t").glob("*/*/model.onnx")) == [
        "a/1/model.onnx", "a/2/model.onnx", "b/1/model.onnx"]
    # other batching: the same model inputs and outputs, so a version (the served config.pbtxt stays)
    served = (tmp_path / "t" / "a" / "config.pbtxt").read_text()
    other_batching = write_repository(bundle, "triton", tmp_path / "t", name="a", version=3, max_batch_size=4, add=True)
    assert (tmp_path / "t" / "a" / "config.pbtxt").read_text() == served
    assert any(n.startswith("a's config.pbtxt stays as it is") for n in other_batching.notes)  # said, not silent
    # another input size: not a version of the same model, for either server
    other = tmp_path / "other"
    other.mkdir()
    export_checkpoint(make_checkpoint(other, "edgekd_cnn_tiny", image_size=24), other / "bundle", ["onnx", "openvino"],
                      ["fp32"], profile_from_dict({"parity": {"images": 4}, "threads": 1}), log=quiet)
    for kind, repo, served_name in (("triton", "t", "a"), ("ovms", "o", "chest")):
        with pytest.raises(EdgeKDError, match=rf"--name {served_name}: version \d's model has other inputs or outputs"):
            write_repository(other / "bundle", kind, tmp_path / repo, name=served_name, version=4, add=True)
        assert not (tmp_path / repo / served_name / "4").exists()
    # a folder copied in by hand, which the repository does not list, is not written over
    (tmp_path / "o" / "byhand" / "1").mkdir(parents=True)
    with pytest.raises(EdgeKDError, match="holds a folder 'byhand' that config.json does not list"):
        write_repository(bundle, "ovms", tmp_path / "o", name="byhand", add=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    # not a repository of that kind, or none at all
    with pytest.raises(EdgeKDError, match=r"not an OpenVINO Model Server repository \(no readable config.json\)$"):
        write_repository(bundle, "ovms", tmp_path / "t", name="c", add=True)  # (it said "FileNotFoundError")
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "config.json").write_text("{model_config_list:")
    with pytest.raises(EdgeKDError, match=r"repository \(its config.json is not JSON\)$"):
        write_repository(bundle, "ovms", tmp_path / "notjson", name="c", add=True)
    (tmp_path / "notjson" / "config.json").write_text('{"models": []}')
    with pytest.raises(EdgeKDError, match=r"repository \(its config.json has no model_config_list of named configs\)$"):
        write_repository(bundle, "ovms", tmp_path / "notjson", name="c", add=True)
    with pytest.raises(EdgeKDError, match=r"not a Triton repository \(no <model>/config.pbtxt\)"):
        write_repository(bundle, "triton", tmp_path / "o", name="c", add=True)
    with pytest.raises(EdgeKDError, match="--add needs an existing triton repository"):
        write_repository(bundle, "triton", tmp_path / "none", add=True)
    assert run_cli(monkeypatch, "repository", str(bundle), "--kind", "triton", "--out", str(tmp_path / "t"),
                   "--name", "d", "--add") == 0
    assert (tmp_path / "t" / "d" / "config.pbtxt").is_file()
    # a version below the one served would never be served: refused (it had been reported as added)
    write_repository(bundle, "triton", tmp_path / "t", name="d", version=5, add=True)
    with pytest.raises(EdgeKDError, match=r"--version 4: model 'd' has version 5, which the servers go on serving "
                                          r"\(the highest\); give --version 6 or more"):
        write_repository(bundle, "triton", tmp_path / "t", name="d", version=4, add=True)
    # an OVMS entry written by hand without a precision hint: named, with the line to add (it printed None)
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    config["model_config_list"].append({"config": {"name": "foo", "base_path": "/models/foo", "nireq": 4}})
    (tmp_path / "o" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeKDError, match=r"config.json sets no INFERENCE_PRECISION_HINT for 'foo' .*set "
                                          r"\"plugin_config\": \{\"INFERENCE_PRECISION_HINT\": \"f32\"\} in its entry"):
        write_repository(bundle, "ovms", tmp_path / "o", name="foo", version=2, add=True)
    # a training run into a served repository is refused, as into a bundle
    from edgekd.pipeline import check_run_dir

    for repo in ("t", "o"):
        with pytest.raises(EdgeKDError, match="holds a model repository"):
            check_run_dir(tmp_path / repo)


def test_a_stop_while_the_model_is_put_in_place_is_told_the_add_had_finished(bundle, tmp_path, monkeypatch, capsys):
    """A stop landing while the add moved the model in was delivered after it: the add was complete, yet the
    command said only "interrupted" (exit 130/143), and a retry was refused as a duplicate. SIGTERM with the CLI's
    own handler (SIGINT may be ignored in a test worker, and a child inherits that)."""
    import signal

    import edgekd.cli.process as process
    import edgekd.runtime.repository as repository

    write_repository(bundle, "ovms", tmp_path / "o", name="chest")
    real = repository.write_repository

    def stopped_while_publishing(*args, on_published, **kwargs):
        def published(repo):
            signal.raise_signal(signal.SIGTERM)  # held until the block ends
            on_published(repo)
        return real(*args, on_published=published, **kwargs)

    def stopped(code):  # the CLI ends a stopped run with os._exit: here an exit pytest survives
        raise SystemExit(code)

    monkeypatch.setattr(repository, "write_repository", stopped_while_publishing)
    monkeypatch.setattr(process, "stopped", stopped)
    monkeypatch.setattr(process, "RECEIVED_SIGNALS", [])  # this run's, not left for the next test
    old = signal.signal(signal.SIGTERM, process._exit_on_signal)
    try:
        code = run_cli(monkeypatch, "repository", str(bundle), "--kind", "ovms", "--out", str(tmp_path / "o"),
                       "--name", "e", "--add")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 128 + signal.SIGTERM
    assert "interrupted (it had finished: model 'e' version 1 is in" in " ".join(capsys.readouterr().err.split())
    assert [c["config"]["name"] for c in json.loads((tmp_path / "o" / "config.json").read_text())["model_config_list"]
            ] == ["chest", "e"]


def test_a_new_version_must_keep_what_its_clients_do_and_a_new_calibration_is_told(bundle, tmp_path, monkeypatch):
    """Only the io shapes had been compared: a retrained model expecting ImageNet mean/std joined a model whose
    README tells clients 0.5, and a new temperature left the README's old one. edgekd-clients.json records what each
    model's clients do; a version that changes their input or classes is refused, other calibration is told."""
    import edgekd.runtime.repository as repository

    write_repository(bundle, "triton", tmp_path / "t", name="m")
    recorded = json.loads((tmp_path / "t" / "edgekd-clients.json").read_text())["models"]["m"]
    assert recorded["readme"] == "README.md" and recorded["preprocess"]["mean"]
    real = repository.client_contract

    def changed(path, value):
        def contract(b):
            c = real(b)
            c[path[0]][path[1]] = value
            return c
        return contract

    monkeypatch.setattr(repository, "client_contract", changed(("preprocess", "mean"), [0.485, 0.456, 0.406]))
    with pytest.raises(EdgeKDError, match=r"--name m: this model's preprocessing differs from the served version's"):
        write_repository(bundle, "triton", tmp_path / "t", name="m", version=2, add=True)
    assert not (tmp_path / "t" / "m" / "2").exists()
    monkeypatch.setattr(repository, "client_contract", changed(("postprocess", "temperature"), 20.0))
    repo = write_repository(bundle, "triton", tmp_path / "t", name="m", version=2, add=True)
    assert any("other calibration or decision threshold" in n and "README.md is rewritten" in n for n in repo.notes)
    assert repo.readme == "README.md"  # the first model's README, not a README-m.md the CLI had named
    assert json.loads((tmp_path / "t" / "edgekd-clients.json").read_text())["models"]["m"]["postprocess"][
        "temperature"] == 20.0
    monkeypatch.setattr(repository, "client_contract", real)
    (tmp_path / "t" / "edgekd-clients.json").unlink()  # an older edgekd's repository: not compared, and said so
    repo = write_repository(bundle, "triton", tmp_path / "t", name="m", version=3, add=True)
    assert any("has no edgekd-clients.json entry for 'm'" in n for n in repo.notes)


def test_no_output_lands_inside_a_model_repository(tmp_path):
    """`edgekd report --out REPO/model/6` had made a version folder holding no model (the server loads the highest
    version); eval and train outputs there were models a server could not load."""
    from edgekd.fileio import refuse_output_inside

    ovms = tmp_path / "ovms"
    ovms.mkdir()
    (ovms / "config.json").write_text(json.dumps({"model_config_list": []}))
    triton = tmp_path / "triton"
    (triton / "m").mkdir(parents=True)
    (triton / "m" / "config.pbtxt").write_text('name: "m"\n')
    for out in (ovms / "evalx", triton / "m" / "6", triton / "trainx" / "deep"):
        with pytest.raises(EdgeKDError, match=r"is inside the model repository .*, which a server may be reading"):
            refuse_output_inside(out, [])
    refuse_output_inside(tmp_path / "elsewhere", [])  # beside them: fine


def test_a_missing_format_names_the_option_that_picks_another(bundle, monkeypatch):
    """`repository --kind triton` of an OpenVINO-only bundle said "--backend openvino runs its ... model", an option
    repository does not have."""
    from edgekd.runtime.bundle import Artifact, Bundle

    only_ov = Bundle(root=Path("b"), meta={}, source=Path("b"), artifacts=[Artifact("openvino", "fp32", Path("m.xml"))])
    with pytest.raises(EdgeKDError, match=r"no onnx fp32 model in the bundle \(it has: openvino/fp32; --backend "
                                          r"openvino runs its openvino fp32 model\)"):
        only_ov.artifact("onnx", "fp32")
    import edgekd.runtime.repository as repository

    monkeypatch.setattr(repository, "open_bundle", lambda *a, **k: only_ov)
    with pytest.raises(EdgeKDError, match=r"; --kind ovms runs its openvino fp32 model\)"):
        repository.write_repository(bundle, "triton", Path("/nonexistent/repo"))


def test_a_served_preprocess_from_before_hair_kernel_matches_its_re_export():
    """A bundle from before data.hair_kernel recorded no key (17 px); its checkpoint re-exported records 17: the
    same preprocessing, which `--name` had refused as differing. A scaled element is other preprocessing."""
    from edgekd.runtime.repository import same_meaning

    old = {"hair_removal": True, "resize": 256}
    assert same_meaning("preprocess", old) == same_meaning("preprocess", {**old, "hair_kernel": 17})
    assert same_meaning("preprocess", old) != same_meaning("preprocess", {**old, "hair_kernel": None})
    assert same_meaning("preprocess", {"resize": 256}) == {"resize": 256}  # no hair removal: nothing to add
