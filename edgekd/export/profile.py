"""Export profiles: the YAML in `export/` naming a deployment target (formats, precisions, tolerances), validated on load."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from edgekd.errors import EdgeKDError
from edgekd.formats import PRECISIONS, TTA_VIEWS
from edgekd.recipe import deep_merge, format_validation_error, load_yaml, refuse_bool_for_number, yaml_error
from edgekd.runtime import MAX_THREADS, cap_to_cores

Precision = Literal[PRECISIONS]
TTAView = Literal[TTA_VIEWS]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a tolerance of nan would pass everything
    _no_bool_numbers = model_validator(mode="before")(classmethod(refuse_bool_for_number))


class Tolerance(Section):
    """A limit left as null is not checked (e.g. no max-abs bound for INT8, whose logits move by design)."""

    max_abs: float | None = Field(None, ge=0)
    """atol of the value check |artifact - reference| <= max_abs + rtol * |reference| on every logit (the
    np.allclose rule, as HF Optimum validates exports): strict for small logits, relative for large ones."""
    rtol: float = Field(0.0, ge=0)
    top1_agreement: float | None = Field(None, ge=0, le=1)
    acc_drop: float | None = Field(None, ge=0, le=1)
    """Allowed drop of accuracy (a fraction: 0.01 = 1 point) on the metric split."""
    auc_drop: float | None = Field(None, ge=0, le=1)


class Tolerances(Section):
    fp32: Tolerance
    fp16: Tolerance
    int8: Tolerance


class RunnerCheck(Section):
    """The end-to-end check: the runtime's Runner on the staged bundle, given the parity images as decoded, against
    the same artifact on the export's preprocessed inputs (the gap is the runner's preprocessing alone)."""

    enabled: bool = True
    max_prob_diff: float | None = Field(0.01, ge=0, le=1)
    """Largest allowed |runner - artifact| on a class probability (the mean of the TTA views' softmax)."""
    top1_agreement: float | None = Field(0.98, ge=0, le=1)


class ParityConfig(Section):
    images: int = Field(64, ge=1)
    """Validation images run through the PyTorch model and every artifact (each in every TTA view)."""
    batch_size: int = Field(7, ge=1)
    """Artifacts are validated at this batch size (and at 1), never at the export's batch size of 2."""
    metric_split: Literal["val", "test"] = "val"
    """The split whose ACC/AUC drop is gated; the other split's metrics are reported too."""
    metric_images: int | None = Field(None, ge=1)
    """This many images per split for the ACC/AUC comparison, a seeded subset with the split's class
    proportions (`edgekd export --metric-images`): a faster, coarser gate on a slow CPU. null, the default: the
    whole split, so the gated drop is measured on every validation image; the card states the count and the
    resolution. The PyTorch reference, calibration and decision threshold always take the whole splits."""
    tolerances: Tolerances
    rounding_factor: float = Field(10.0, ge=1, le=1000)
    """A model's own FP32 rounding, measured against a float64 run of it on up to 64 parity inputs: a fused export
    (`fuse: true`) may differ from the unfused model by up to this many times it (plus the fp32 tolerance) before
    the artifacts are gated against the fused form; an artifact's logits exceeding the value tolerance are allowed
    this many times it on top (a model FP32 itself computes to 1e-4 cannot be exported closer than that)."""
    runner: RunnerCheck = RunnerCheck()
    """What `edgekd predict` runs must predict what the gate checked (export/runner_check.py)."""
    on_fail: Literal["error", "drop"] = "error"
    """error: any failing artifact fails the whole export (nothing written). drop: the bundle ships the artifacts
    that pass; each one left out is listed with its reasons in parity.json and the card (all failing: an error)."""

    @field_validator("batch_size")
    @classmethod
    def _not_the_export_batch(cls, v: int) -> int:
        if v == 2:  # the graph is traced at batch 2; validating there would not prove the axis is dynamic
            raise ValueError("must differ from the export batch size 2")
        return v


class OnnxQuantization(Section):
    """ONNX Runtime `quantize_static` options (QDQ format; int8 weights, uint8 activations)."""

    per_channel: bool = True
    """One weight scale per output channel (per tensor when false)."""
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """How activation ranges are read from the calibration images (percentile: CalibPercentile 99.999)."""
    reduce_range: bool = False
    """7-bit weights (ONNX Runtime's guard against int16 overflow on CPUs without VNNI)."""
    exclude_op_types: list[str] = []
    """ONNX op types left in FP32 (every node of these types, e.g. [Mul, HardSigmoid] for hard-swish and the
    squeeze-excite gates of MobileNetV3), besides keep_first_last."""
    op_types: list[str] | None = Field(None, min_length=1)
    """ONNX op types quantized (ONNX Runtime's op_types_to_quantize). null, the default: every op type ONNX Runtime
    quantizes for a CNN; only the compute ops Conv, Gemm and MatMul for a transformer (quantization.model_type).
    On the zoo's ViT-S/16 at 224 px, quantizing LayerNorm, Softmax, Add and GELU too left 96.35% top-1 agreement
    with FP32; the compute ops alone kept 99.74%, and ran 1.19x the FP32 speed at batch 1, 1.52x at batch 8
    (benchmarks/RESULTS.md, zoo)."""


class OpenVINOQuantization(Section):
    """NNCF options for the OpenVINO INT8 artifact."""

    ignored_types: list[str] = []
    """OpenVINO op types NNCF leaves in FP32 (nncf.IgnoredScope(types=...), e.g. [Multiply, HSwish])."""


class QuantizationConfig(Section):
    calib_images: int = Field(300, ge=1)
    """Training-split images (eval preprocessing) used to calibrate INT8 activations."""
    accuracy_control: bool = False
    """OpenVINO INT8 via nncf.quantize_with_accuracy_control: layers go back to FP32 until the drop <= max_drop."""
    max_drop: float = Field(0.01, ge=0, le=1)
    """Accuracy-control budget: absolute accuracy drop on the validation split."""
    fast_bias_correction: bool | None = None
    """NNCF's fast bias correction (quicker) or the full algorithm. null, the default: full for a CNN, because it
    held INT8 within the 1-point ACC budget where the fast one did not (PneumoniaMNIST CNN: 0.5 vs 1.3 points,
    benchmarks/export.py); fast for a transformer (model_type), as Optimum Intel does: on the zoo's ViT-S/16 the
    full one took 71 s of the export and gave the same INT8 model quality (100% top-1 agreement, max logit diff
    0.073 either way)."""
    keep_first_last: bool = True
    """Keep the first and last Conv/Gemm/MatMul in FP32 (ONNX Runtime nodes_to_exclude, with the pooling and flatten
    ops that feed the last one, so it reads an FP32 activation as under NNCF; NNCF ignored_scope): the
    first conv sees the raw normalized image, and quantizing it cost most of INT8's top-1 agreement on
    PneumoniaMNIST (ORT: 96.6% -> 99.8% on the gate's inputs with it kept; NNCF ResNet-18: 99.6% -> 100% on val)."""
    min_speedup: float | None = Field(1.0, gt=0)
    """An INT8 artifact ships only if it runs at least this many times faster than the FP32 artifact of its format
    in the same export (batch 1, the profile's threads, timed in alternating blocks at export); a slower one is left out of
    the bundle, and the card and parity.json say why. On this 2-core EPYC, ONNX Runtime's INT8 (QDQ) kernels ran
    EfficientNet-B2 and MobileNetV3-Large slower than their FP32 (benchmarks/RESULTS.md, zoo). null: ship INT8
    whatever its speed."""
    preset: Literal["mixed", "performance"] = "mixed"
    """NNCF preset: mixed = symmetric weights, asymmetric activations (hard-swish and other activations with a
    negative tail keep their range); performance = symmetric both. On a from-scratch MobileNetV3-Large (224 px,
    PneumoniaMNIST) mixed kept 97.7% top-1 agreement on 300 val images where performance kept 90.7%."""
    model_type: Literal["auto", "cnn", "transformer"] = "auto"
    """The transformer scheme for attention models: NNCF's ModelType.TRANSFORMER, and ONNX Runtime quantizes only
    Conv, Gemm and MatMul (unless onnx.op_types says otherwise); auto looks for attention layers."""
    onnx: OnnxQuantization = OnnxQuantization()
    openvino: OpenVINOQuantization = OpenVINOQuantization()


class OnnxConfig(Section):
    opset: int = Field(18, ge=13)
    simplify: bool = True
    """Simplify the graph with onnxslim (kept unsimplified if onnxslim fails)."""
    dynamo: bool = False
    """torch.onnx's dynamo exporter (needs onnxscript). Off by default: the TorchScript exporter gives the same
    graphs for timm CNNs, the custom CNN and timm ViTs here and is 3-6x faster."""


class TTAConfig(Section):
    views: list[TTAView] = Field(list(TTA_VIEWS), min_length=1)
    center_crop_fraction: float = Field(0.875, gt=0, le=1)

    @field_validator("views")
    @classmethod
    def _once_each(cls, views: list[str]) -> list[str]:  # the runtime refuses a bundle whose views repeat
        if len(set(views)) != len(views):
            raise ValueError(f"a view is named twice: {views}")
        return views


class CalibrationConfig(Section):
    """Probability calibration fit on the validation split at export and applied by the runner."""

    method: Literal["temperature", "platt", "none"] = "temperature"
    """temperature: one scalar T (logits / T) fit by NLL on the validation logits; platt (two classes): a slope and
    a bias on the logit difference, fit the same way; none: raw softmax."""


class DecisionConfig(Section):
    """The operating point: how a binary bundle turns calibrated probabilities into a label."""

    rule: Literal["argmax", "sensitivity", "specificity", "youden"] = "argmax"
    """sensitivity / specificity: the threshold on validation that reaches `target` (screening / confirmation);
    youden: the one maximizing sensitivity + specificity - 1; argmax: the top class (the only rule for a
    multi-class model: another is refused at export)."""
    target: float | None = Field(None, gt=0, le=1)
    """The sensitivity or specificity to reach (those rules only)."""
    positive: str | int = 1
    """The positive class (its name or index) whose probability the threshold applies to (a two-class model); unset,
    the checkpoint's recipe's data.positive_class, else index 1."""

    @field_validator("positive", mode="before")
    @classmethod
    def _not_a_flag(cls, v):
        if isinstance(v, bool):  # `positive: false` had been class 0
            raise ValueError("give the positive class's name or index, not true/false")
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.rule in ("sensitivity", "specificity") and self.target is None:
            raise ValueError(f"decision.rule '{self.rule}' needs decision.target (e.g. 0.95)")
        if self.rule not in ("sensitivity", "specificity") and self.target is not None:  # the card had said ">= it"
            raise ValueError(f"decision.target is for the sensitivity and specificity rules; rule '{self.rule}' has "
                             "none")


class CardConfig(Section):
    intended_use: str = ("Research use only; not a medical device. Not validated for clinical decisions.")
    limitations: list[str] = ["Trained and tested on one data set; performance on other sites, scanners "
                              "and populations is unknown.",
                              "Figures hold for this data set's own validation and test splits only."]


class ExportProfile(Section):
    name: str = "default"
    description: str = ""
    formats: list[Literal["onnx", "openvino"]] = Field(["onnx", "openvino"], min_length=1)
    precisions: list[Precision] = Field(["fp32"], min_length=1)
    input_size: int | None = Field(None, ge=8)
    """Export at this (square) input size instead of the checkpoint's; the eval resize scales with it."""
    fuse: bool = True
    """Export a model with re-parameterizable blocks (RepVGG, MobileOne, FastViT, RepViT, LeViT...) in its fused
    inference form (timm's reparameterize_model), checked against the unfused model (`parity.rounding_factor`); false:
    the training form."""
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    """CPU threads for parity runs (at most this machine's cores) and the runtime hint written to edgekd.json
    (null: the library default; the runner caps it to the device's cores)."""

    tta: TTAConfig = TTAConfig()
    parity: ParityConfig
    quantization: QuantizationConfig = QuantizationConfig()
    onnx: OnnxConfig = OnnxConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    decision: DecisionConfig = DecisionConfig()
    card: CardConfig = CardConfig()
    min_retention: float = Field(0.98, ge=0, le=1)
    """Continual checkpoints: the retention gate. Every earlier task must keep at least this fraction of its
    accuracy right after it was learned (final / then, from the checkpoint's accuracy matrix), or the export is
    refused (`--allow-forgetting` exports anyway and says so in the card)."""

    _origin: str | None = PrivateAttr(None)

    def __eq__(self, other: object) -> bool:  # the same settings, wherever they were read from (not `_origin`)
        return isinstance(other, ExportProfile) and self.model_dump() == other.model_dump()

    __hash__ = None  # mutable settings, as pydantic models are

    @property
    def origin(self) -> str:
        """Where the settings came from, for messages: the YAML file read, else the profile's name."""
        return self._origin or self.name

    def run_threads(self) -> int | None:
        """The threads the export's own runs use: `threads`, at most this machine's cores."""
        return cap_to_cores(self.threads) if self.threads else None


DEFAULTS: dict[str, Any] = {
    "parity": {"tolerances": {
        "fp32": {"max_abs": 1e-4, "rtol": 1e-5, "top1_agreement": 1.0},
        "fp16": {"max_abs": 1e-2, "rtol": 1e-2, "top1_agreement": 0.995},
        "int8": {"top1_agreement": 0.98, "acc_drop": 0.01, "auc_drop": 0.01},
    }},
}


def loosened_tolerances(tolerances: Tolerances, precisions) -> list[str]:
    """The gate limits of `precisions` a profile sets looser than edgekd's defaults (DEFAULTS) or switches off,
    e.g. "int8 top1_agreement off (default 0.98)": the card and the export's console say so (a profile with every
    INT8 limit null had read "pass" without a word)."""
    looser = []
    for precision, default in DEFAULTS["parity"]["tolerances"].items():
        if precision not in precisions:
            continue
        for key, limit in default.items():
            value = getattr(getattr(tolerances, precision), key)
            if value is None or (value < limit if key == "top1_agreement" else value > limit):
                looser.append(f"{precision} {key} {'off' if value is None else f'{value:g}'} (default {limit:g})")
    return looser


def profile_from_dict(raw: dict[str, Any] | None, where: str = "export profile") -> ExportProfile:
    """Validate a profile mapping over the defaults (a partial `tolerances.fp16` keeps the other fp16 limits)."""
    if raw is not None and not isinstance(raw, dict):
        raise EdgeKDError(f"{where}: an export profile must be a YAML mapping")
    try:
        return ExportProfile.model_validate(deep_merge(DEFAULTS, raw or {}))
    except ValidationError as err:
        raise EdgeKDError(format_validation_error(err, where)) from None


def profile_digest(profile: ExportProfile) -> str:
    """16 hex digits of sha256 over the edgekd version and every setting of the profile: a bundle exported by
    another edgekd or under other settings is not the export these settings would make now."""
    from edgekd import __version__

    return hashlib.sha256(f"{__version__}\n{profile.model_dump_json()}".encode()).hexdigest()[:16]


PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
"""The shipped profiles (package data, so a wheel install has them too)."""


def shipped_profiles() -> list[str]:
    """The names `--target` takes for the shipped profiles (cpu-all, cpu-onnx-fp32, ...)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(target: str | Path) -> Path:
    """A profile file: `target` itself when it is a file, else the shipped profile of that name (with or without
    .yaml, e.g. `cpu-openvino-int8`); EdgeKDError naming the shipped ones when neither exists."""
    path = Path(target)
    if path.is_file():
        return path
    if path.is_dir():
        raise EdgeKDError(f"{path}: a folder, not an export profile (YAML file)")
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if name in shipped_profiles() and (len(path.parts) == 1 or path.parent.name == "export"):
        return PROFILES_DIR / f"{name}.yaml"  # export/NAME.yaml: where the profiles lived before they were packaged
    raise EdgeKDError(f"{path}: export profile not found (a YAML file, or a shipped profile: "
                      f"{', '.join(['default', *shipped_profiles()])})")


def load_profile(path: str | Path | None) -> ExportProfile:
    """An export profile: a YAML file or a shipped profile's name (e.g. cpu-openvino-int8); None, or the defaults'
    own name `default` (what a bundle records of them) when no file has that name, gives the defaults."""
    if path is None or (str(path) == "default" and not Path(path).is_file()):
        return profile_from_dict({}, "defaults")
    given, path = str(path), profile_path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))  # (the locale's encoding had read "café" as an error)
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    except UnicodeDecodeError:  # a binary file given as --target: UnicodeDecodeError, exit 1
        raise EdgeKDError(f"{path}: is not UTF-8 text (an export profile is a YAML file)") from None
    if raw is None:  # an empty file (or comments only) is a mistake, not a request for the defaults
        raise EdgeKDError(f"{path}: the export profile is empty (omit --target for the default profile)")
    if isinstance(raw, dict) and "name" not in raw:  # recorded in the bundle: a file's own name, not "default"
        raw = {**raw, "name": path.stem}
    profile = profile_from_dict(raw, str(path))
    profile._origin = given  # as given (a shipped name or a file): an edited copy keeps a shipped profile's name
    return profile
