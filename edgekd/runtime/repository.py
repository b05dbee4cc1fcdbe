"""Model repositories for serving engines, from a verified bundle: NVIDIA Triton (ONNX Runtime backend) and
OpenVINO Model Server. The model files are the bundle's own artifacts, byte for byte (checked against its
sha256 manifest as they are read); the repository is built aside and published by one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgeKDError
from edgekd.formats import PRECISIONS
from edgekd.hair import describe_hair_removal, recorded_kernel
from edgekd.fileio import (check_output_location, deferred_signals, held_folder, remove_tree, staging_directory,
                           track_tree, untrack_tree, write_json, write_text)
from edgekd.runtime.bundle import Artifact, Bundle, open_bundle
from edgekd.runtime.preprocess import LUMA
from edgekd.runtime.runner import check_artifact

KINDS = {"triton": "onnx", "ovms": "openvino"}
"""Repository kind -> the bundle format it serves."""
TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
                "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8",
                "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL"}
"""ONNX Runtime's element type names -> Triton's model-config data types."""
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as Triton declares it: dims without the batch axis, -1 for a dynamic one."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass
class Repository:
    out: Path
    kind: str
    model_name: str
    files: dict[str, str]
    """Relative path of each model file in the repository -> its sha256 (the bundle manifest's)."""
    notes: list[str] = field(default_factory=list)
    """What the caller should tell the user (e.g. a new version's calibration differs from the served one's)."""
    readme: str = "README.md"
    """The README that states this model's client steps (README-<name>.md for a model --add brought in)."""


CLIENTS_FILE = "edgekd-clients.json"
"""At the repository's top: per model, what its clients rely on (`client_contract`) and the README that says it, so
a new version is checked against it (servers ignore the file)."""


def same_meaning(key: str, value: Any) -> Any:
    """A served version's contract value as it acts: a preprocess from before data.hair_kernel (no key) removed hair
    with the 17 px element that a re-export of its checkpoint now records."""
    if key == "preprocess" and isinstance(value, dict) and value.get("hair_removal") and "hair_kernel" not in value:
        return {**value, "hair_kernel": recorded_kernel(value)}
    return value


def client_contract(bundle: Bundle) -> dict[str, Any]:
    """What a model's clients do around the server's call (the README's steps): the input preprocessing, the classes
    the outputs mean, and the postprocessing (temperature, bias, threshold, the heads' slices), as JSON gives it."""
    threshold, positive = bundle.decision
    return json.loads(json.dumps({
        "class_names": bundle.class_names, "preprocess": bundle.preprocess,
        "postprocess": {"temperature": bundle.temperature, "calibration_bias": bundle.calibration_bias,
                        "threshold": threshold, "positive": positive, "tasks": bundle.tasks}}))


def onnx_signature(model: bytes) -> tuple[list[TensorSpec], list[TensorSpec], bool]:
    """(inputs, outputs, whether the first axis is a dynamic batch axis) of an ONNX model, as ONNX Runtime reads
    it (the core install's ONNX reader)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    args = [*session.get_inputs(), *session.get_outputs()]
    batched = all(a.shape and not isinstance(a.shape[0], int) for a in args)

    def spec(arg) -> TensorSpec:
        if arg.type not in TRITON_TYPES:
            raise EdgeKDError(f"triton: tensor '{arg.name}' has type {arg.type}, which has no Triton data type here")
        dims = arg.shape[1:] if batched else arg.shape
        return TensorSpec(arg.name, TRITON_TYPES[arg.type], tuple(d if isinstance(d, int) else -1 for d in dims))

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()], batched


def triton_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int,
                  queue_delay_us: int, threads: int | None) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig): ONNX Runtime platform, the io signature,
    dynamic batching of concurrent requests up to max_batch_size, one CPU instance."""
    def tensors(kind: str, specs: list[TensorSpec]) -> list[str]:
        items = [f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
                 for s in specs]
        return [f"{kind} [", ",\n".join(items), "]"]

    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}",
             *tensors("input", inputs), *tensors("output", outputs)]
    if max_batch_size > 0:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", "    count: 1", "    kind: KIND_CPU", "  }", "]"]
    if threads:  # the export profile's thread hint, as the runner uses it
        lines += ["parameters {", '  key: "intra_op_thread_count"', f'  value: {{ string_value: "{threads}" }}', "}"]
    return "\n".join(lines) + "\n"


def ovms_config(name: str, base_path: str, artifact: Artifact) -> dict[str, Any]:
    """config.json of OpenVINO Model Server: the model's name and folder; CPU math in the precision the export's
    parity gate used (f32), as edgekd.runtime compiles the IR."""
    config: dict[str, Any] = {"name": name, "base_path": base_path, "target_device": "CPU"}
    if artifact.inference_precision_hint:
        config["plugin_config"] = {"INFERENCE_PRECISION_HINT": artifact.inference_precision_hint}
    return {"model_config_list": [{"config": config}]}


def _check_out(out: Path, stage: Path | None = None) -> None:
    """--out is new, or an empty folder (`stage`: the staging folder inside it, which does not count)."""
    if out.exists() and not out.is_dir():
        raise EdgeKDError(f"--out {out}: a file, not a directory; choose a new directory for the repository")
    if out.exists() and any(p != stage for p in out.iterdir()):
        raise EdgeKDError(f"--out {out}: exists and is not empty; choose a new directory for the repository")


def stages_inside(out: Path) -> bool:
    """Whether a new repository is staged inside --out (an empty folder that cannot be swapped by a rename: a mount
    point such as a container volume, on another device than its parent, or under a parent it may not write) rather
    than beside it (then published by one rename)."""
    return out.is_dir() and (os.path.ismount(out) or out.parent.stat().st_dev != out.stat().st_dev
                             or not os.access(out.parent, os.W_OK | os.X_OK))


def publish_new(stage: Path, out: Path) -> None:
    """A staged new repository becomes --out: one rename from beside it, or from inside it its entries moved in
    (each whole: a server polling sees a model folder complete; OVMS's config.json last)."""
    if stage.parent != out:
        if out.exists():
            out.rmdir()
        os.rename(stage, out)
        return
    for entry in sorted(stage.iterdir(), key=lambda p: p.name == "config.json"):
        os.rename(entry, out / entry.name)
    stage.rmdir()


def _copy_verified(data: bytes, digest: str | None, target: Path) -> str:
    """Write the artifact's verified bytes; their sha256 (the manifest's)."""
    actual = hashlib.sha256(data).hexdigest()
    if digest is None or actual != digest:  # open_bundle(verify=True) always gives a digest
        raise EdgeKDError(f"{target.name}: no verified sha256 for this artifact; refusing to copy it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return actual


def _stage_triton(bundle: Bundle, art: Artifact, stage: Path, name: str, max_batch_size: int,
                  queue_delay_us: int, version: int) -> tuple[dict[str, str], dict[str, Any]]:
    model, _ = art.read()
    inputs, outputs, batched = onnx_signature(model)
    rel = f"{name}/{version}/model.onnx"
    files = {rel: _copy_verified(model, art.sha256, stage / rel)}
    text = triton_config(name, inputs, outputs, max_batch_size if batched else 0, queue_delay_us, bundle.threads)
    write_text(stage / name / "config.pbtxt", text)
    return files, {"inputs": inputs, "outputs": outputs, "batched": batched}


def _stage_ovms(bundle: Bundle, art: Artifact, stage: Path, name: str, base_path: str,
                version: int) -> tuple[dict[str, str], dict]:
    model, weights = art.read()
    folder = f"{name}/{version}"
    files = {f"{folder}/model.xml": _copy_verified(model, art.sha256, stage / folder / "model.xml"),
             f"{folder}/model.bin": _copy_verified(weights or b"", art.weights_sha256, stage / folder / "model.bin")}
    write_json(stage / "config.json", ovms_config(name, f"{base_path.rstrip('/')}/{name}", art))
    return files, {}


def _check_options(kind: str, precision: str | None, max_batch_size: int, version: int, base_path: str) -> None:
    if kind not in KINDS:
        raise EdgeKDError(f"--kind: unknown repository kind '{kind}' (choose from {', '.join(KINDS)})")
    if precision is not None and precision.lower() not in PRECISIONS:
        raise EdgeKDError(f"--precision: unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    if max_batch_size < 1:
        raise EdgeKDError("--max-batch: must be at least 1")
    if version < 1:
        raise EdgeKDError("--version: must be at least 1 (the servers' version folders are 1, 2, ...)")
    if kind == "ovms" and not (base_path.startswith("/") and base_path.rstrip("/")
                               and ".." not in base_path.split("/") and re.fullmatch(r"[A-Za-z0-9._/-]+", base_path)):
        raise EdgeKDError(f"--base-path {base_path!r}: an absolute folder inside the server's container other than /, "
                          "without '..', of letters, digits and . _ - / (e.g. /models: the README's docker command "
                          "uses it as it is), where the repository is mounted")


def server_options(kind: str, max_batch_size: int | None, queue_delay_us: int | None,
                   base_path: str | None) -> tuple[int, int, str]:
    """The server options with their defaults (32, 2000, /models); one given for the other server is refused (it
    had been taken and ignored)."""
    other = {"--max-batch": max_batch_size, "--queue-delay-us": queue_delay_us} if kind == "ovms" else {
        "--base-path": base_path} if kind == "triton" else {}
    if any(v is not None for v in other.values()):
        raise EdgeKDError(f"{' '.join(o for o, v in other.items() if v is not None)}: an option of --kind "
                          f"{'triton' if kind == 'ovms' else 'ovms'}, not of --kind {kind}")
    return (32 if max_batch_size is None else max_batch_size, 2000 if queue_delay_us is None else queue_delay_us,
            "/models" if base_path is None else base_path)


def write_repository(bundle_path: str | Path, kind: str, out: str | Path, precision: str | None = None,
                     name: str | None = None, max_batch_size: int | None = None, queue_delay_us: int | None = None,
                     base_path: str | None = None, version: int = DEFAULT_VERSION, add: bool = False,
                     on_published: Callable[[Repository], None] | None = None) -> Repository:
    """The `kind` repository (triton: the bundle's ONNX model; ovms: its OpenVINO IR) at `out`, with a README
    stating the preprocessing clients must apply; the model files in the version folder `version` (an update of a
    served model: the same name, the next version). `out` must be new or empty; nothing is left on failure.
    `add`: `out` is a repository of this kind already, and the model joins it (`add_to_repository`).
    `on_published` is called with the result as soon as it is in place (a stop signal held until then is
    delivered after it: the CLI then says the work had finished). Triton's `max_batch_size` (default 32) and
    `queue_delay_us` (2000), OpenVINO Model Server's `base_path` (/models): the other server's is refused."""
    max_batch_size, queue_delay_us, base_path = server_options(kind, max_batch_size, queue_delay_us, base_path)
    _check_options(kind, precision, max_batch_size, version, base_path)
    out = Path(out)
    if out.is_symlink():  # a link to a folder: the repository goes there (rename would not replace the link)
        if not out.resolve().is_dir():
            raise EdgeKDError(f"--out {out}: a symlink to {out.resolve()}, which is not a folder")
        out = out.resolve()
    if add:
        served_models(out, kind)  # not a repository: refused before the bundle is read
    else:
        _check_out(out)
    check_output_location(out)  # a read-only folder: named as --out (it had named the staging folder)
    bundle = open_bundle(bundle_path, verify=True)
    art = bundle.artifact(KINDS[kind], precision or bundle.most_precise(),
                          lambda fmt: f"--kind {next(k for k, f in KINDS.items() if f == fmt)}")
    check_artifact(bundle, art.format, art.precision)  # clients follow the README this writes from edgekd.json
    # an updated (or multi-head) bundle has other outputs than its parent: by default it gets its own name, with its
    # output count (it had taken the parent's, and "same name, next version" swapped a 2-class model for a 12-output one)
    outputs = f"_{len(bundle.class_names)}out" if bundle.meta.get("lineage") or bundle.tasks else ""
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"{bundle.model.get('name') or 'model'}{outputs}_{art.precision}")
    if not MODEL_NAME.match(name):
        raise EdgeKDError(f"--name {name!r}: use letters, digits, '_', '-' or '.' (at most 64, a letter or digit first)")
    published = on_published or (lambda repo: None)
    if add:
        return add_to_repository(bundle, art, kind, out, name, max_batch_size, queue_delay_us, base_path, version,
                                 published)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = staged = None
    inside = stages_inside(out)  # an empty mounted volume: staged in it (rmdir and rename there had failed)
    try:
        with deferred_signals():  # tracked: a stop signal removes it (the CLI exits without unwinding)
            stage = staged = track_tree(staging_directory(".edgekd-new." if inside else f".{out.name}.", ".tmp",
                                                          out if inside else out.parent))
        if kind == "triton":
            files, io = _stage_triton(bundle, art, stage, name, max_batch_size, queue_delay_us, version)
        else:
            files, io = _stage_ovms(bundle, art, stage, name, base_path, version)
        write_text(stage / "README.md", repository_readme(bundle, kind, name, art, files, io, base_path))
        write_json(stage / CLIENTS_FILE, {"models": {name: {**client_contract(bundle), "readme": "README.md"}}})
        _check_out(out, stage)
        with deferred_signals():
            publish_new(stage, out)
            stage = None
            published(repo := Repository(out, kind, name, files))
    finally:
        if stage is not None:
            remove_tree(stage)
        untrack_tree(staged)
    return repo


def is_model_repository(folder: str | Path) -> bool:
    """A Triton (<model>/config.pbtxt) or OpenVINO Model Server (config.json with model_config_list) repository."""
    folder = Path(folder)
    if next(folder.glob("*/config.pbtxt"), None) is not None:
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return isinstance(config, dict) and "model_config_list" in config
    except (OSError, ValueError, TypeError):
        return False


def served_models(out: Path, kind: str) -> dict[str, Any]:
    """The models a repository of `kind` at `out` serves (name -> its config.pbtxt text, or its config.json entry),
    or a one-line error when `out` is not such a repository."""
    if not out.is_dir():
        raise EdgeKDError(f"--out {out}: --add needs an existing {kind} repository (write the first model without --add)")
    if kind == "triton":
        models = {p.parent.name: p.read_text(encoding="utf-8") for p in sorted(out.glob("*/config.pbtxt"))}
        if not models:
            raise EdgeKDError(f"--out {out}: not a Triton repository (no <model>/config.pbtxt)")
        return models
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        entries = [e["config"] for e in config["model_config_list"]]
        return {e["name"]: e for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as err:
        why = ("no readable config.json" if isinstance(err, OSError) else "its config.json is not JSON"
               if isinstance(err, ValueError) else "its config.json has no model_config_list of named configs")
        raise EdgeKDError(f"--out {out}: not an OpenVINO Model Server repository ({why})") from None


def add_to_repository(bundle: Bundle, art: Artifact, kind: str, out: Path, name: str, max_batch_size: int,
                      queue_delay_us: int, base_path: str, version: int,
                      published: Callable[[Repository], None]) -> Repository:
    """A model joins a served repository: a new name (its folder, and for OVMS an entry appended to config.json's
    model_config_list, which a copied-in folder lacked: OVMS never loaded it), or the next version of a model it
    serves, whose model file must have the same inputs and outputs as its highest version (the served config.pbtxt
    or config.json entry stays as it is). The repository is held for the whole add (two had raced on config.json);
    the model is staged beside it (inside it, hidden, when beside is another filesystem or not writable) and moved
    in by one rename, config.json rewritten after it, atomically; the model's README is README-<name>.md."""
    with held_folder(out, "repository --add"):
        served = served_models(out, kind)  # read again under the lock
        _refuse_to_add(out, kind, served, name, version, base_path, art)
        return _add(bundle, art, kind, out, name in served, name, max_batch_size, queue_delay_us, base_path, version,
                    published)


def _refuse_to_add(out: Path, kind: str, served: dict[str, Any], name: str, version: int, base_path: str,
                   art: Artifact) -> None:
    if name not in served and (out / name).exists():
        listed = "config.json does not list" if kind == "ovms" else "has no config.pbtxt"
        raise EdgeKDError(f"--out {out}: holds a folder '{name}' that {listed} (copied in by hand?); remove it or "
                          "give another --name")
    if (out / name / str(version)).exists():
        raise EdgeKDError(f"--out {out}: model '{name}' has a version {version} already; give the next --version "
                          "(or another --name)")
    if (served_version := _served_version(out, name)) is not None and int(served_version.name) > version:
        raise EdgeKDError(f"--version {version}: model '{name}' has version {served_version.name}, which the servers "
                          f"go on serving (the highest); give --version {int(served_version.name) + 1} or more")
    homes = {str(Path(e.get("base_path", "")).parent) for e in served.values()} if kind == "ovms" else set()
    if kind == "ovms" and name not in served and len(homes) == 1 and homes != {base_path.rstrip("/") or "/"}:
        raise EdgeKDError(f"--base-path {base_path}: config.json's models are under {homes.pop()}, where the "
                          "repository is mounted; give that --base-path (one mount serves them all)")
    if kind == "ovms" and name in served:
        entry = served[name]
        if entry.get("base_path") != f"{base_path.rstrip('/')}/{name}":
            raise EdgeKDError(f"--base-path {base_path}: config.json serves '{name}' from {entry.get('base_path')}")
        hint, needed = (entry.get("plugin_config") or {}).get("INFERENCE_PRECISION_HINT"), art.inference_precision_hint
        if hint != needed:
            runs = (f"runs '{name}' with INFERENCE_PRECISION_HINT {hint}" if hint else
                    f"sets no INFERENCE_PRECISION_HINT for '{name}' (OVMS then picks its own, reduced on some CPUs)")
            raise EdgeKDError(f"--precision {art.precision}: config.json {runs}; this artifact was gated at {needed}: "
                              + (f"set \"plugin_config\": {{\"INFERENCE_PRECISION_HINT\": \"{needed}\"}} in its entry, or "
                                 if needed else "") + "give another --name")


def model_signature(kind: str, folder: Path) -> tuple:
    """A version folder's model inputs and outputs (names, types, shapes): what clients of the model rely on."""
    if kind == "triton":
        inputs, outputs, batched = onnx_signature((folder / MODEL_FILES[kind]).read_bytes())
        return tuple(inputs), tuple(outputs), batched
    import openvino as ov

    model = ov.Core().read_model(folder / MODEL_FILES[kind])
    return tuple(tuple((p.get_any_name(), p.get_element_type().get_type_name(), str(p.get_partial_shape()))
                       for p in ports) for ports in (model.inputs, model.outputs))


MODEL_FILES = {"triton": "model.onnx", "ovms": "model.xml"}


def _served_version(out: Path, name: str, kind: str | None = None) -> Path | None:
    """The highest version folder of model `name` (with its model file, when `kind` is given)."""
    versions = [p for p in (out / name).iterdir() if p.is_dir() and p.name.isdigit()
                and (kind is None or (p / MODEL_FILES[kind]).is_file())] if (out / name).is_dir() else []
    return max(versions, key=lambda p: int(p.name), default=None)


def _add(bundle: Bundle, art: Artifact, kind: str, out: Path, serves_name: bool, name: str, max_batch_size: int,
         queue_delay_us: int, base_path: str, version: int, published: Callable[[Repository], None]) -> Repository:
    stage = staged = None
    beside = not stages_inside(out)  # one rule with a new repository's (a bind mount on one device: EXDEV)
    try:
        with deferred_signals():  # beside: where a polling server does not see it
            stage = staged = track_tree(staging_directory(f".{out.name}.add." if beside else ".edgekd-add.", ".tmp",
                                                          out.parent if beside else out))
        if kind == "triton":
            files, io = _stage_triton(bundle, art, stage, name, max_batch_size, queue_delay_us, version)
        else:
            files, io = _stage_ovms(bundle, art, stage, name, base_path, version)
        if (previous := _served_version(out, name, kind)) is not None and \
                model_signature(kind, previous) != model_signature(kind, stage / name / str(version)):
            raise EdgeKDError(f"--name {name}: version {previous.name}'s model has other inputs or outputs (names, "
                              "types, shapes) than this one; a new version must keep them: give another --name")
        clients, readme, notes = _client_records(bundle, out, name, serves_name, version)
        kept = out / name / "config.pbtxt"
        if kind == "triton" and serves_name and kept.is_file() and \
                kept.read_text() != (stage / name / "config.pbtxt").read_text():  # options had gone without a word
            notes.append(f"{name}'s config.pbtxt stays as it is (a new version is served under its model's "
                         "config): this call's --max-batch / --queue-delay-us and the bundle's thread hint apply to a "
                         "new --name")
        write_text(stage / readme, repository_readme(bundle, kind, name, art, files, io, base_path))
        write_json(stage / CLIENTS_FILE, clients)
        with deferred_signals():
            if serves_name:
                (out / name).mkdir(exist_ok=True)  # config.json may list a model whose folder is not there yet
                os.rename(stage / name / str(version), out / name / str(version))
            else:
                os.rename(stage / name, out / name)
            os.replace(stage / readme, out / readme)
            os.replace(stage / CLIENTS_FILE, out / CLIENTS_FILE)
            if kind == "ovms" and not serves_name:
                config = json.loads((out / "config.json").read_text(encoding="utf-8"))
                config["model_config_list"] += json.loads((stage / "config.json").read_text())["model_config_list"]
                write_json(out / "config.json", config)
            published(repo := Repository(out, kind, name, files, notes, readme))
    finally:
        if stage is not None:
            remove_tree(stage)
        untrack_tree(staged)
    return repo


def _client_records(bundle: Bundle, out: Path, name: str, serves_name: bool,
                    version: int) -> tuple[dict[str, Any], str, list[str]]:
    """(the repository's clients file with this model's entry, the README that describes the model, notes). A new
    version whose clients would send other tensors or read other classes is refused (its io shapes alone had been
    compared: a model expecting ImageNet mean/std joined one whose README says 0.5); other calibration is a note,
    and the model's README is rewritten for it."""
    clients: dict[str, Any] = {"models": {}}
    try:
        loaded = json.loads((out / CLIENTS_FILE).read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and isinstance(loaded.get("models"), dict):
            clients = loaded
    except (OSError, ValueError):  # none (an older edgekd's repository, or one written by hand)
        pass
    contract = client_contract(bundle)
    old = clients["models"].get(name) if serves_name and isinstance(clients["models"].get(name), dict) else None
    notes = [] if old is not None or not serves_name else [
        f"{out} has no {CLIENTS_FILE} entry for '{name}' (written by an older edgekd, or by hand): this version's "
        "preprocessing and classes were not compared with the served one's"]
    if old is not None:
        for key, what in (("preprocess", "preprocessing differs"), ("class_names", "classes differ")):
            if same_meaning(key, old.get(key)) != same_meaning(key, contract[key]):
                raise EdgeKDError(f"--name {name}: this model's {what} from the served version's (clients would "
                                  f"send other tensors or read other classes: {key} {old.get(key)} vs {contract[key]}); "
                                  "give another --name")
        if old.get("postprocess") != contract["postprocess"]:
            notes.append(f"version {version} of '{name}' has other calibration or decision threshold than the served "
                         f"version: {old.get('readme')} is rewritten with its figures; clients must take them up")
    readme = old.get("readme", f"README-{name}.md") if old is not None else f"README-{name}.md"
    clients["models"][name] = {**contract, "readme": readme}
    return clients, readme, notes


def preprocessing_steps(pre: dict[str, Any]) -> list[str]:
    """What a client does to an image before the server's model, step by step as edgekd.runtime does it (a client
    that resizes another way, e.g. OpenCV's INTER_LINEAR without antialiasing, flips some labels)."""
    c, h, w = pre["input_size"]
    interpolation = pre["interpolation"]
    how = ("Pillow's `Image.resize(..., Image.Resampling.BILINEAR)`, which antialiases when it shrinks "
           "(torchvision's `resize(..., antialias=True)` on uint8 matches; OpenCV's INTER_LINEAR does not)"
           if interpolation == "bilinear" else interpolation)
    to_channels = ("a gray image's one channel repeated three times" if c == 3 else
                   f"a color image to gray by luminance {', '.join(f'{float(v):g}' for v in LUMA)} (R, G, B "
                   "weights in float32, the sum truncated)")
    return [f"1. Decode the image: apply its EXIF orientation tag (a file's or an upload's), drop alpha; a 16-bit "
            "or float gray image is scaled to 0-255 by its own min..max (rounded), a 16-bit colour image keeps each "
            "channel's high byte (Pillow's reading); DICOM through its modality and VOI LUTs (edgekd.imageio). "
            f"{pre['channel_order']} channel order; {to_channels}.",
            *([f"2. {describe_hair_removal(pre)} (edgekd.hair.remove_hair), as in training."]
              if pre.get("hair_removal") else []),
            f"{3 if pre.get('hair_removal') else 2}. Resize the shorter side to {pre['resize']} px (the longer in "
            f"proportion, rounded down) with {how}, then center-crop {h}x{w}: top = round((height - {h}) / 2), "
            f"left = round((width - {w}) / 2), halves rounded to even as torchvision does (zero padding first where "
            "the image is smaller, the odd pixel at the bottom and right).",
            f"{4 if pre.get('hair_removal') else 3}. float32: multiply the 0-255 pixels by {pre['scale']:.6g}, "
            f"subtract mean {pre['mean']}, divide by std {pre['std']}.",
            f"{5 if pre.get('hair_removal') else 4}. Layout {pre.get('layout', 'NCHW')}: shape (N, {c}, {h}, {w}).",
            "`edgekd.runtime.Preprocessor(bundle.preprocess)` does all of this without PyTorch (pip install edgekd)."]


def _postprocessing_lines(bundle: Bundle) -> list[str]:
    if bundle.tasks:  # a multi-head bundle: one softmax per task's slice of the outputs
        return ["The output is raw logits of every task's head side by side: " + "; ".join(
            f"{t['name']}: outputs [{t['outputs'][0]}, {t['outputs'][1]}) = {', '.join(t['class_names'])}"
            for t in bundle.tasks) + ". Probabilities: a softmax over each task's slice; label: the most probable "
            "class of the task asked for (no calibration or threshold is fit for multi-head bundles)."]
    threshold, positive = bundle.decision
    lines = [f"The output is raw logits over {', '.join(bundle.class_names)} (in that order). "
             "Probabilities: softmax(logits / T" + (" + bias" if bundle.calibration_bias else "") + ")"
             + f" with T = {bundle.temperature:.6g}"
             + (f", bias = {bundle.calibration_bias}" if bundle.calibration_bias else "") + "."]
    if threshold is not None:
        lines.append(f"Label: {bundle.class_names[positive]} when its probability >= {threshold:.6g}, else the "
                     "other class.")
    else:
        lines.append("Label: the most probable class.")
    return lines


def repository_readme(bundle: Bundle, kind: str, name: str, art: Artifact, files: dict[str, str],
                      io: dict[str, Any], base_path: str) -> str:
    """What the repository holds, the preprocessing and postprocessing a client applies, how to start the server."""
    engine = "NVIDIA Triton Inference Server" if kind == "triton" else "OpenVINO Model Server"
    meta_io = bundle.io
    lines = [f"# {name}: {engine} model repository", "",
             f"Written by `edgekd repository` from the bundle `{bundle.source.name}` ({bundle.model.get('name')}, "
             f"{art.format} {art.precision}). The model file(s) are the bundle's, byte for byte:", "",
             *[f"- `{rel}` sha256 `{digest}`" for rel, digest in files.items()], "",
             "## Input", "",
             f"Tensor `{meta_io['input']}`, output `{meta_io['output']}`. The graph holds no preprocessing (the "
             "bundle's IR and ONNX model are the bare network; `edgekd predict`/`serve` add it: the OpenVINO path "
             "folds it into the compiled model with PrePostProcessor at load time, not into the file), so every "
             "client sends preprocessed tensors:", "", *preprocessing_steps(bundle.preprocess), "",
             "## Output", "", *_postprocessing_lines(bundle), "",
             "## More models and versions", "",
             "Both servers serve the highest version folder of a model by default. To roll out a retrained model "
             "with the same inputs and outputs: `edgekd repository NEW_BUNDLE --kind "
             f"{kind} --out <this folder> --add --name {name} --version <next>` (a model with other inputs or "
             "outputs is refused; the served config stays as it is). Another model joins with "
             "`--add` under its own name (an `edgekd update` bundle adds outputs, the new task's classes, so it "
             "gets its own name by default and clients slice its outputs anew)"
             + (": its entry is appended to `config.json`'s `model_config_list` (OpenVINO Model Server loads only "
                "the models listed there, and re-reads the file while it runs)." if kind == "ovms" else
                ". Triton loads models added while it runs with "
                "`--model-control-mode=poll` (the default, `none`, loads them at the next start)."), ""]
    if kind == "triton":
        lines += ["## Start", "", "```",
                  "# from inside this folder (the repository)",
                  "docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v \"$PWD\":/models "
                  "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models", "```", "",
                  "`config.pbtxt` batches concurrent requests server-side (`dynamic_batching`) up to "
                  f"`max_batch_size`{'' if io.get('batched') else ' (0: this model has a fixed batch)'}."]
    else:
        lines += ["## Start", "", "```",
                  "# from inside this folder (the repository)",
                  f"docker run --rm -p 9000:9000 -p 8000:8000 -v \"$PWD\":{base_path.rstrip('/')} "
                  f"openvino/model_server:latest --config_path {base_path.rstrip('/')}/config.json "
                  "--port 9000 --rest_port 8000", "```", "",
                  f"`config.json` names the model folder as the container sees it (`base_path` under {base_path}); "
                  "the IR's batch axis is dynamic, so a client may send N images in one request."]
    return "\n".join(lines) + "\n"
