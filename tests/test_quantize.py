"""INT8 options of the export profile reach ONNX Runtime's quantize_static and NNCF, and show in the graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import export_plain_onnx
from edgekd.errors import EdgeKDError
from edgekd.export import profile_from_dict
from edgekd.export.artifact import ExportContext
from edgekd.export.quantize import nncf_options, ort_quantize_options, quantize_onnx_static, quantize_openvino


class SwishNet(nn.Module):
    """Conv -> x * sigmoid(x) (a Mul whose input has a negative tail, as in hard-swish/SiLU nets) -> conv -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x * torch.sigmoid(x))
        return self.fc(x.mean((2, 3)))


def calibration(n: int = 16) -> np.ndarray:
    return np.random.default_rng(0).normal(0.3, 1.0, size=(n, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def swish_onnx(tmp_path_factory) -> Path:
    return export_plain_onnx(SwishNet().eval(), tmp_path_factory.mktemp("q") / "swish.onnx", torch.zeros(1, 3, 8, 8))


def quantized_graph(src: Path, tmp_path: Path, keep_first_last: bool = False, **onnx_keys):
    import onnx

    options = profile_from_dict({"quantization": {"onnx": onnx_keys}}).quantization.onnx
    out = tmp_path / "int8.onnx"
    quantize_onnx_static(src, out, calibration(), tmp_path, options, keep_first_last)
    return onnx.load(str(out)).graph


def quantized_nodes(graph, op_type: str) -> int:
    """How many `op_type` nodes read only DequantizeLinear outputs (ONNX Runtime's QDQ form of an int8 op; an
    excluded node may still read a quantized producer's output, but not on every input)."""
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in graph.node if n.op_type == op_type and all(i in dq_outputs for i in n.input if i))


def test_onnx_keys_reach_quantize_static(swish_onnx, monkeypatch, tmp_path):
    import onnxruntime.quantization as ortq

    seen, real = {}, ortq.quantize_static
    monkeypatch.setattr(ortq, "quantize_static", lambda src, dst, reader, **kw: (seen.update(kw),
                                                                                 real(src, dst, reader, **kw)))
    keys = {"per_channel": False, "calibrate_method": "percentile", "reduce_range": True, "exclude_op_types": ["Mul"]}
    options = profile_from_dict({"quantization": {"onnx": keys}}).quantization.onnx
    quantize_onnx_static(swish_onnx, tmp_path / "x.onnx", calibration(4), tmp_path, options, keep_first_last=True)
    assert seen["per_channel"] is False and seen["reduce_range"] is True
    assert seen["calibrate_method"] == ortq.CalibrationMethod.Percentile
    assert seen["extra_options"] == {"CalibPercentile": 99.999}
    assert seen["quant_format"] == ortq.QuantFormat.QDQ and seen["activation_type"] == ortq.QuantType.QUInt8
    import onnx

    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / "onnx_int8_prepared.onnx")).graph.node}
    excluded = {nodes[name] for name in seen["nodes_to_exclude"]}
    # first conv + last Gemm and the pooling that feeds it (keep_first_last) + every Mul
    assert excluded == {"Conv", "Gemm", "ReduceMean", "Mul"}


class PoolNet(nn.Module):
    """Conv -> ReLU -> Conv -> global average pool -> flatten -> Linear: timm's CNN head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.features(x))


def test_keep_first_last_keeps_the_heads_input_float_too(tmp_path):
    """The last Gemm's weights stayed FP32, but ONNX Runtime quantized the GlobalAveragePool and Flatten before it:
    the head still read an 8-bit activation (Flatten -> QuantizeLinear -> DequantizeLinear -> Gemm)."""
    src = export_plain_onnx(PoolNet().eval(), tmp_path / "pool.onnx", torch.zeros(1, 3, 8, 8))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    dq_fed = lambda g: {i for n in g.node if n.op_type == "Gemm" for i in n.input  # noqa: E731
                        if any(o == i for d in g.node if d.op_type == "DequantizeLinear" for o in d.output)}
    kept = quantized_graph(src, tmp_path / "a", keep_first_last=True)
    gemm = next(n for n in kept.node if n.op_type == "Gemm")
    producer = {o: n.op_type for n in kept.node for o in n.output}
    assert producer[gemm.input[0]] == "Flatten" and not dq_fed(kept)
    assert quantized_nodes(kept, "Conv") == 1  # the second conv is still INT8
    assert dq_fed(quantized_graph(src, tmp_path / "b", keep_first_last=False))  # without it the head reads INT8
    # every compute op kept FP32: Q/DQ around the pool alone is no INT8 artifact (it had shipped as one)
    (tmp_path / "c").mkdir()
    with pytest.raises(EdgeKDError, match="quantized no Conv/Gemm/MatMul weights of this graph"):
        quantized_graph(src, tmp_path / "c", keep_first_last=True, exclude_op_types=["Conv"])
    assert not (tmp_path / "c" / "int8.onnx").exists()


def test_default_onnx_options_are_minmax_per_channel(swish_onnx):
    from onnxruntime.quantization import CalibrationMethod

    options = profile_from_dict({}).quantization.onnx
    kw = ort_quantize_options(swish_onnx, options, keep_first_last=False)
    assert kw["per_channel"] and kw["calibrate_method"] == CalibrationMethod.MinMax and kw["nodes_to_exclude"] == []
    assert "extra_options" not in kw


def test_excluded_op_types_stay_float(swish_onnx, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert quantized_nodes(quantized_graph(swish_onnx, tmp_path / "a"), "Mul") == 1
    graph = quantized_graph(swish_onnx, tmp_path / "b", exclude_op_types=["Mul", "Sigmoid"])
    assert quantized_nodes(graph, "Mul") == 0
    assert quantized_nodes(graph, "Conv") == 2  # the convs are still quantized


def tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                             embed_dim=16, num_heads=2, num_classes=2).eval()


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory) -> Path:
    return export_plain_onnx(tiny_vit(), tmp_path_factory.mktemp("v") / "vit.onnx", torch.zeros(1, 3, 16, 16))


def test_transformer_scheme_quantizes_only_the_compute_ops(vit_onnx, tmp_path):
    """ViT under ONNX Runtime's default op set gets int8 LayerNorm scales and Add/Mul constants; the transformer
    scheme leaves those FP32 and still gives the Linear layers (MatMul) int8 weights."""
    import onnx

    def int8_weight_readers(out: Path, transformer: bool, **keys) -> set[str]:
        """Op types with an input dequantized from an int8 constant (a quantized weight)."""
        out.mkdir()
        options = profile_from_dict({"quantization": {"onnx": keys}}).quantization.onnx
        calib = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
        quantize_onnx_static(vit_onnx, out / "int8.onnx", calib, out, options, False, transformer=transformer)
        graph = onnx.load(str(out / "int8.onnx")).graph
        consts = {i.name for i in graph.initializer}
        weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
        return {n.op_type for n in graph.node if any(i in weights for i in n.input)}

    cnn = int8_weight_readers(tmp_path / "cnn", transformer=False)
    transformer = int8_weight_readers(tmp_path / "t", transformer=True)
    assert "LayerNormalization" in cnn and "MatMul" in cnn
    assert "MatMul" in transformer and transformer <= {"Conv", "Gemm", "MatMul"}
    # the profile's op_types win over the scheme
    assert int8_weight_readers(tmp_path / "p", transformer=True, op_types=["Conv"]) == {"Conv"}


def test_op_types_that_match_no_node_are_an_error_not_an_fp32_int8_artifact(swish_onnx, tmp_path):
    with pytest.raises(EdgeKDError, match="quantized no Conv/Gemm/MatMul weights of this graph .*LayerNormalization"):
        quantized_graph(swish_onnx, tmp_path, op_types=["LayerNormalization"])  # an ONNX op this graph lacks
    assert not (tmp_path / "int8.onnx").exists()
    with pytest.raises(EdgeKDError, match=r"quantization.onnx.op_types: Linear: not an ONNX operator type"):
        quantized_graph(swish_onnx, tmp_path, op_types=["Linear"])  # a PyTorch name


def test_fp32_op_types_a_graph_lacks_are_warned_of_and_a_misspelt_one_refused(swish_onnx, tmp_path):
    """A type matching nothing was passed over without a word while the card said it was kept FP32."""
    from edgekd.export.onnx import onnx_quantization_note

    with pytest.raises(EdgeKDError, match=r"quantization.onnx.exclude_op_types: Hardsigmoid: not an ONNX operator"):
        quantized_graph(swish_onnx, tmp_path / "a", exclude_op_types=["Mul", "Hardsigmoid"])
    with pytest.warns(UserWarning, match=r"exclude_op_types: no HardSigmoid node of this graph \(its op types: .*Mul"):
        graph = quantized_graph(swish_onnx, tmp_path / "b", exclude_op_types=["Mul", "HardSigmoid"])
    cfg = profile_from_dict({"quantization": {"onnx": {"exclude_op_types": ["Mul", "HardSigmoid"]}}}).quantization
    assert onnx_quantization_note(cfg, present={n.op_type for n in graph.node}).endswith(", FP32 op types Mul")
    ctx = nncf_context({"openvino": {"ignored_types": ["Swish", "HSwish"]}, "keep_first_last": True})
    with pytest.warns(UserWarning, match=r"ignored_types: no HSwish op of this model \(its op types: .*Swish"):
        kwargs, about = nncf_options(openvino_model(), ctx)
    assert about.endswith("FP32 op types Swish") and kwargs["ignored_scope"].types == ["Swish"]


def test_onnx_int8_export_of_a_vit_uses_the_transformer_scheme(tmp_path):
    """The exporter itself (not only quantize_onnx_static) resolves model_type auto on the model it exports."""
    from edgekd.export.onnx import export_onnx_artifact

    calib = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    ctx = ExportContext(model=tiny_vit(), input_shape=(3, 16, 16), metadata={}, profile=profile_from_dict({}),
                        scratch=tmp_path, calibration=lambda: calib, validation=lambda: None)
    info = export_onnx_artifact(ctx, "int8", tmp_path / "model_int8.onnx")
    assert info["quantization"].endswith("op types quantized Conv, Gemm, MatMul (transformer scheme)")


def test_transformer_scheme_follows_model_type_and_is_noted(vit_onnx):
    from edgekd.export.onnx import onnx_quantization_note
    from edgekd.export.quantize import uses_transformer_scheme

    def ctx(model, model_type: str) -> ExportContext:
        return ExportContext(model=model, input_shape=(3, 16, 16), metadata={},
                             profile=profile_from_dict({"quantization": {"model_type": model_type}}), scratch=Path("."),
                             calibration=lambda: None, validation=lambda: None)

    assert uses_transformer_scheme(ctx(tiny_vit(), "auto")) and not uses_transformer_scheme(ctx(SwishNet(), "auto"))
    assert uses_transformer_scheme(ctx(SwishNet(), "transformer")) and not uses_transformer_scheme(ctx(tiny_vit(), "cnn"))
    kw = ort_quantize_options(vit_onnx, profile_from_dict({}).quantization.onnx, False, transformer=True)
    assert kw["op_types_to_quantize"] == ["Conv", "Gemm", "MatMul"]
    assert "op_types_to_quantize" not in ort_quantize_options(vit_onnx, profile_from_dict({}).quantization.onnx, False)
    note = onnx_quantization_note(profile_from_dict({}).quantization, transformer=True)
    assert "op types quantized Conv, Gemm, MatMul (transformer scheme)" in note


def test_per_tensor_weights_have_one_scale(swish_onnx, tmp_path):
    from onnx import numpy_helper

    def weight_scale_sizes(graph) -> set[int]:
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        return {inits[n.input[1]].size for n in graph.node
                if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4}

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert weight_scale_sizes(quantized_graph(swish_onnx, tmp_path / "a")) == {8}  # one scale per output channel
    assert weight_scale_sizes(quantized_graph(swish_onnx, tmp_path / "b", per_channel=False)) == {1}


def test_unknown_onnx_key_is_refused():
    with pytest.raises(EdgeKDError, match="quantization.onnx.calibrate_method"):
        profile_from_dict({"quantization": {"onnx": {"calibrate_method": "kl"}}})
    with pytest.raises(EdgeKDError, match="quantization.onnx.op_types"):  # quantizing nothing is no INT8 model
        profile_from_dict({"quantization": {"onnx": {"op_types": []}}})


def nncf_context(quantization: dict) -> ExportContext:
    calib = calibration()
    return ExportContext(model=SwishNet().eval(), input_shape=(3, 8, 8), metadata={},
                         profile=profile_from_dict({"quantization": quantization}), scratch=Path("."),
                         calibration=lambda: calib, validation=lambda: (calib, np.zeros(len(calib), np.int64)))


def openvino_model():
    import openvino as ov

    return ov.convert_model(SwishNet().eval(), example_input=torch.zeros(1, 3, 8, 8))


def fake_quantize_ranges(model) -> list[tuple[str, float, float]]:
    """(consumer op type, input_low, input_high) of every activation FakeQuantize (weights' are constants)."""
    rows = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() == "Constant":
            continue
        low, high = (float(np.min(op.input_value(i).get_node().get_data())) for i in (1, 2))
        consumers = {t.get_node().get_type_name() for t in op.output(0).get_target_inputs()}
        rows += [(c, low, high) for c in consumers]
    return rows


def is_symmetric(low: float, high: float) -> bool:
    return low == 0 or np.isclose(low, -high * 128 / 127, rtol=1e-3)


@pytest.mark.parametrize("preset", ["mixed", "performance"])
def test_nncf_preset_sets_activation_symmetry(preset):
    ctx = nncf_context({"preset": preset, "keep_first_last": False, "calib_images": 16})
    quantized, info = quantize_openvino(openvino_model(), ctx)
    ranges = fake_quantize_ranges(quantized)
    assert ranges and f"({preset} preset)" in info["quantization"]
    asymmetric = [r for r in ranges if not is_symmetric(r[1], r[2])]
    assert bool(asymmetric) == (preset == "mixed")  # mixed: asymmetric activations where the range is one-sided


def test_nncf_ignored_types_reach_the_ignored_scope():
    # (It named Multiply, which this model does not have, OpenVINO fusing x * sigmoid(x) into Swish: vacuous.)
    model = openvino_model()
    plain = {c for c, _, _ in fake_quantize_ranges(quantize_openvino(model, nncf_context({}))[0])}
    ctx = nncf_context({"openvino": {"ignored_types": ["ReduceMean"]}, "keep_first_last": True})
    kwargs, about = nncf_options(model, ctx)
    scope = kwargs["ignored_scope"]
    assert scope.types == ["ReduceMean"] and len(scope.names) == 2 and "FP32 op types ReduceMean" in about
    quantized, _ = quantize_openvino(model, ctx)
    consumers = {c for c, _, _ in fake_quantize_ranges(quantized)}
    assert "ReduceMean" in plain and "ReduceMean" not in consumers and "Convolution" in consumers


@pytest.mark.parametrize("quantization, fast", [({}, False), ({"model_type": "transformer"}, True),
                                                ({"model_type": "transformer", "fast_bias_correction": False}, False),
                                                ({"fast_bias_correction": True}, True)])
def test_bias_correction_is_full_for_cnns_and_fast_for_transformers(quantization, fast):
    kwargs, about = nncf_options(openvino_model(), nncf_context(quantization))
    assert kwargs["fast_bias_correction"] is fast
    assert ("fast bias correction" if fast else "full bias correction") in about


def test_onnx_runtimes_root_logger_lines_are_collected_not_printed(capsys):
    """ONNX Runtime's quantizer logs one root-logger line per weight (62 for DenseNet-121): collected, then said
    once as a warning by the export."""
    import logging

    from edgekd.export.quantize import quiet_root_logger

    before = logging.getLogger().handlers[:]
    with quiet_root_logger() as notes:
        for i in range(3):
            logging.warning("Axis 1 is out-of-range for weight 'w%d' with rank 1", i)
    assert notes == [f"Axis 1 is out-of-range for weight 'w{i}' with rank 1" for i in range(3)]
    assert logging.getLogger().handlers == before
    assert "out-of-range" not in capsys.readouterr().err



def test_accuracy_control_refuses_a_multi_head_model():
    """Its validation_fn takes one argmax over all outputs: a multi-head model's heads are scored apart."""
    import dataclasses

    ctx = dataclasses.replace(nncf_context({"accuracy_control": True}),
                              metadata={"tasks": [{"name": "a", "outputs": [0, 1]}, {"name": "b", "outputs": [1, 2]}]})
    with pytest.raises(EdgeKDError, match=r"^openvino int8: quantization.accuracy_control scores one argmax over all "
                                          r"outputs; a multi-head"):
        quantize_openvino(openvino_model(), ctx)
