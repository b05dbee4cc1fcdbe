"""Models: timm factory, custom CNN, heads, freezing, local weights, counts."""

import pytest
import torch

from edgekd.errors import EdgeKDError
from edgekd.recipe import recipe_from_dict
from edgekd.models import (classifier_name, count_macs, count_parameters, create_model, deploy_form, freeze,
                           get_submodule, head_parameters)


def spec(name="edgekd_cnn_tiny", **kw):
    return {"name": name, "num_classes": 3, "in_chans": 3, **kw}


@pytest.mark.parametrize("name", ["edgekd_cnn_tiny", "test_resnet", "test_efficientnet", "test_vit"])
def test_factory_builds_uniform_interface(name):
    size = 32 if name == "test_vit" else 16
    m = create_model(spec(name, kwargs={"img_size": size} if name == "test_vit" else {})).eval()
    x = torch.randn(2, 3, size, size)
    assert m(x).shape == (2, 3)
    assert m.forward_head(m.forward_features(x)).shape == (2, 3)
    assert get_submodule(m, classifier_name(m)).out_features == 3


def test_unknown_model_is_a_clear_error():
    with pytest.raises(EdgeKDError, match="unknown timm model 'resnet_nope'"):
        create_model(spec("resnet_nope"))


@pytest.mark.parametrize("head,n_linear", [("dropout_linear", 1), ("mlp", 2)])
def test_custom_heads(head, n_linear):
    m = create_model(spec("test_resnet", head=head, head_dropout=0.5, head_hidden=7)).eval()
    h = get_submodule(m, classifier_name(m))
    assert sum(isinstance(x, torch.nn.Linear) for x in h.modules()) == n_linear
    assert {id(p) for p in head_parameters(m)} == {id(p) for p in h.parameters()}
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_freeze_stages_and_patterns():
    m = create_model(spec("edgekd_cnn"))
    n = freeze(m, stages=1)
    frozen = {k for k, p in m.named_parameters() if not p.requires_grad}
    assert n > 0 and all(k.startswith("stages.0.") for k in frozen)
    m = create_model(spec("test_resnet"))
    freeze(m, patterns=[r"^layer1\."])
    assert all(not p.requires_grad for k, p in m.named_parameters() if k.startswith("layer1."))
    assert all(p.requires_grad for k, p in m.named_parameters() if k.startswith("fc."))
    # Freezing the classifier group too, a pattern of no parameter, every parameter: one-line errors (they had been
    # "optimizer got an empty parameter list", or nothing frozen without a word).
    for kwargs, words in (({"stages": 4}, "freeze_stages 4: .* 4 parameter groups, the last one its classifier; "
                                          "freeze at most 3"),
                          ({"patterns": ["^layer1"]}, "freeze_patterns: '\\^layer1' matches no parameter"),
                          ({"patterns": ["."]}, "freeze every parameter")):
        with pytest.raises(EdgeKDError, match=words):
            freeze(create_model(spec("edgekd_cnn")), **kwargs)
    with pytest.raises(EdgeKDError, match="freeze_patterns.*is not a regular expression"):
        recipe_from_dict({"model": {"freeze_patterns": ["stages.0.("]}})
    from edgekd.recipe import refuse_new_run_traps

    with pytest.raises(EdgeKDError, match="head_hidden"):  # a new run only: a checkpoint's recipe still loads
        refuse_new_run_traps(recipe_from_dict({"model": {"head": "mlp", "head_hidden": 0}}), "r")


def test_local_weights_file_loads(tmp_path):
    src = create_model(spec("test_resnet"))
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    m = create_model(spec("test_resnet"), weights=str(path))
    for (k, a), b in zip(src.state_dict().items(), m.state_dict().values()):
        if not k.startswith("fc."):  # timm re-inits a classifier it cannot match
            assert torch.equal(a, b), k
    with pytest.raises(EdgeKDError, match="could not load pretrained weights from local file"):
        create_model(spec("test_resnet"), weights=str(tmp_path / "missing.pth"))


def test_hub_weights_out_of_reach_name_the_offline_fix(monkeypatch, caplog):
    """Without network a full-size recipe failed after the hub's retries with no word of what to do."""
    import logging

    import timm

    def offline(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(EdgeKDError, match=r"from the model hub .*OSError.*\(offline: --set model.pretrained=false, "
                                          r"or model.weights=FILE\)$"):
        create_model(spec("test_resnet"), pretrained=True)
    assert "Retrying" not in caplog.text  # the hub's retry lines (about 24 of them) are not shown


def test_hub_weights_load_from_the_cache_offline_and_the_run_records_their_revision_and_sha256(tmp_path, monkeypatch):
    """Hub weights were recorded as the timm name alone: the hub repository can change under it. The weights timm
    loaded (here from huggingface_hub's cache, offline, as on a machine that fetched them once) are now pinned by
    the snapshot's commit and the file's sha256."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from edgekd.fileio import sha256_file
    from edgekd.models import hub_weights
    from edgekd.train.run import init_weights

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(1)
    src = create_model({"name": "test_resnet", "num_classes": 1000, "in_chans": 3})
    weights = repo / "snapshots" / commit / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, weights)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    m = create_model(spec("test_resnet.r160_in1k"), pretrained=True)
    assert torch.equal(m.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    pinned = {"hub": "test_resnet.r160_in1k", "repo": "timm/test_resnet.r160_in1k", "revision": commit,
              "filename": "model.safetensors", "sha256": sha256_file(weights)}
    assert hub_weights("test_resnet.r160_in1k") == pinned
    recipe = recipe_from_dict({"name": "r", "data": {"source": "builtin"},
                               "model": {"name": "test_resnet.r160_in1k", "pretrained": True}})
    assert init_weights(recipe.model) == pinned
    weights.unlink()  # not in the cache: the name and repository only, no revision claimed
    assert hub_weights("test_resnet.r160_in1k") == {"hub": "test_resnet.r160_in1k", "repo": "timm/test_resnet.r160_in1k"}
    assert hub_weights("edgekd_cnn_tiny") == {"hub": "edgekd_cnn_tiny"}  # no hub weights at all


def test_weights_file_of_another_model_or_unreadable_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, tmp_path / "unrelated.safetensors")
    with pytest.raises(EdgeKDError, match=r"do not fit this architecture: 74 of its 75 tensors \(99.9% of the "
                                          r"parameters outside the classifier\) are not in them"):
        create_model(spec("test_resnet"), weights=str(tmp_path / "unrelated.safetensors"))
    torch.save(create_model(spec("test_vit")).state_dict(), tmp_path / "vit.pth")  # another architecture's names
    with pytest.raises(EdgeKDError, match="do not fit this architecture"):
        create_model(spec("test_resnet"), weights=str(tmp_path / "vit.pth"))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not weights\n")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    partial = create_model(spec("test_resnet")).state_dict()  # a few tensors missing (e.g. added by kwargs): loads,
    torch.save({k: v for i, (k, v) in enumerate(partial.items()) if i % 10}, tmp_path / "partial.pth")  # but said
    with pytest.warns(UserWarning, match=r"8 of its 75 tensors \([0-9.]+% of the parameters outside the classifier\) "
                                         r"are not in the weights from local file .*partial.pth and stay randomly"):
        create_model(spec("test_resnet"), weights=str(tmp_path / "partial.pth"))
    for bad in ("empty.pt", "text.pt", "junk.safetensors"):
        with pytest.raises(EdgeKDError, match=f"could not load pretrained weights from local file .*{bad}: "):
            create_model(spec("test_resnet"), weights=str(tmp_path / bad))


def test_weights_check_holds_with_logging_silenced(tmp_path):
    # The check hears timm's "Missing keys" log record: with logging disabled it passed a foreign file silently.
    import logging

    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, tmp_path / "unrelated.safetensors")
    timm_log = logging.getLogger("timm.models._builder")
    logging.disable(logging.CRITICAL)
    try:
        with pytest.raises(EdgeKDError, match="do not fit this architecture"):
            create_model(spec("test_resnet"), weights=str(tmp_path / "unrelated.safetensors"))
        assert logging.root.manager.disable == logging.CRITICAL  # the caller's setting is back
    finally:
        logging.disable(logging.NOTSET)
    timm_log.disabled = True  # dictConfig(disable_existing_loggers=True) does this
    try:
        with pytest.raises(EdgeKDError, match="do not fit this architecture"):
            create_model(spec("test_resnet"), weights=str(tmp_path / "unrelated.safetensors"))
        assert timm_log.disabled and timm_log.propagate
    finally:
        timm_log.disabled = False
    from timm.models import _builder

    assert _builder._logger is timm_log  # timm's logger is back after a refused build


def test_custom_cnn_refuses_unknown_kwargs():
    # SmallCNN swallowed any keyword: a misspelt key, or a Swin recipe's window_size carried over by
    # --set model.name=edgekd_cnn_small, was silently ignored.
    with pytest.raises(EdgeKDError, match=r"bad model.kwargs .*unexpected keyword argument 'window_size'.*; --set "
                                          r"'model.kwargs=\{\}' clears the recipe's, for another model\)$"):
        create_model({"name": "edgekd_cnn_small", "num_classes": 2, "in_chans": 1, "kwargs": {"window_size": 8}})


def test_parameter_and_mac_counts():
    m = create_model({"name": "edgekd_cnn_tiny", "num_classes": 2, "in_chans": 1})
    # conv(1->8)+bn, conv(8->8)+bn, conv(8->16)+bn, conv(16->16)+bn, fc(16->2)
    expected = (9 * 8 + 16) + (72 * 8 + 16) + (72 * 16 + 32) + (144 * 16 + 32) + (16 * 2 + 2)
    assert count_parameters(m) == expected
    macs = count_macs(m, (1, 16, 16))
    conv_macs = 16 * 16 * (9 * 8 + 72 * 8) + 8 * 8 * (72 * 16 + 144 * 16)
    assert conv_macs <= macs <= conv_macs * 1.05 + 32


def test_custom_cnn_family_sizes_at_28px():
    """The edge student must stay an order of magnitude cheaper than the baseline it is compared with."""
    from edgekd.models import count_macs, count_parameters

    sizes = {n: (count_parameters(create_model(spec(n))), count_macs(create_model(spec(n)), (3, 28, 28)))
             for n in ("edgekd_cnn", "edgekd_cnn_small", "edgekd_cnn_tiny")}
    assert sizes["edgekd_cnn_tiny"] < sizes["edgekd_cnn_small"] < sizes["edgekd_cnn"]
    params, macs = sizes["edgekd_cnn_small"]
    assert params < 50_000 and macs < 5_000_000 and sizes["edgekd_cnn"][1] > 6 * macs


def test_the_custom_cnns_load_a_local_weights_file_or_an_edgekd_checkpoint(tmp_path):
    """model.weights on an edgekd_cnn model had failed with 'edgekd_cnn has no pretrained weights'."""
    src = create_model(spec("edgekd_cnn_tiny", num_classes=2))
    torch.save({"format": "edgekd-checkpoint", "state_dict": src.state_dict()}, tmp_path / "best.pt")
    m = create_model(spec("edgekd_cnn_tiny"), weights=str(tmp_path / "best.pt"))  # 3 classes: its own head
    body = [k for k in src.state_dict() if not k.startswith("fc.")]
    assert body and all(torch.equal(src.state_dict()[k], m.state_dict()[k]) for k in body)
    assert m.fc.out_features == 3
    torch.save(create_model(spec("edgekd_cnn_micro")).state_dict(), tmp_path / "micro.pth")
    with pytest.raises(EdgeKDError, match=r"micro.pth: ValueError: not this model's weights: 'stages.0.0.weight' "
                                          r"\(8, 3, 3, 3\) where this model has \(12, 3, 3, 3\)$"):
        create_model(spec("edgekd_cnn_small"), weights=str(tmp_path / "micro.pth"))
    with pytest.raises(EdgeKDError, match=r"^model 'edgekd_cnn_tiny' has no weights on the model hub: give "
                                          r"model.weights=FILE \(a state dict or an edgekd checkpoint of the same "
                                          r"model\), or model.pretrained=false$"):
        create_model(spec("edgekd_cnn_tiny"), pretrained=True)


def test_an_unknown_module_path_names_the_modules_there():
    from edgekd.models import get_submodule

    m = create_model(spec("edgekd_cnn_tiny"))
    with pytest.raises(EdgeKDError, match=r"^SmallCNN has no module 'stages.9' \('stages' has 0, 1\)$"):
        get_submodule(m, "stages.9")
    with pytest.raises(EdgeKDError, match=r"has no module 'a.b' \(its top level has stages, pool, drop, fc\)$"):
        get_submodule(m, "a.b")


def test_a_fixed_patch_grid_model_at_another_input_size_is_refused_by_name():
    """The skin teacher (SwinV2, 256 px) at 32 px failed at its first forward with timm's AssertionError (exit 1)."""
    import timm

    from edgekd.models import check_input_size

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2)
    check_input_size(vit, 224, "vit_tiny_patch16_224")
    with pytest.raises(EdgeKDError, match=r"model vit_tiny_patch16_224 takes 224x224 px input \(a fixed patch grid\) "
                                          r"and data.image_size is 32: set model.kwargs.img_size: 32$"):
        check_input_size(vit, 32, "vit_tiny_patch16_224")
    check_input_size(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32), 32, "vit")
    check_input_size(timm.create_model("resnet18", pretrained=False, num_classes=2), 32, "resnet18")  # any size
    # LeViT's attention-bias grid has no patch_embed.strict_img_size: a RuntimeError deep in the model had been the
    # message (exit 1); timm marks it fixed-size, and one forward at the recipe's size now says what to set.
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=2)
    with pytest.raises(EdgeKDError, match=r"model levit_128s takes 224x224 px input \(timm: a fixed input size\) "
                                          r"and data.image_size is 32: set model.kwargs.img_size: 32"):
        check_input_size(levit, 32, "levit_128s")
    assert levit.training  # left as it was
    check_input_size(timm.create_model("levit_128s", pretrained=False, num_classes=2, img_size=32), 32, "levit")
    # any model whose downsampling runs past 1 px at a small size: a raw "Kernel size can't be greater than actual
    # input size" at the first training step (ConvNeXt-V2 at 8 px, its 4x stem then three 2x stages)
    convnext = timm.create_model("convnextv2_atto", pretrained=False, num_classes=2)
    with pytest.raises(EdgeKDError, match=r"^model convnextv2_atto fails a forward at 8 px \(data.image_size; a "
                                          r"stage that downsamples past 1 px, or a fixed grid\): give a larger size"):
        check_input_size(convnext, 8, "convnextv2_atto")
    check_input_size(convnext, 32, "convnextv2_atto")
    from edgekd.models import create_model  # a one-channel model without timm's in_chans is run on one channel

    check_input_size(create_model({"name": "edgekd_cnn_tiny", "num_classes": 2, "in_chans": 1}), 16, "cnn", 1)


def test_deploy_form_fuses_timm_rep_blocks_into_a_copy_that_computes_the_same():
    from timm.models.byobnet import RepVggBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(RepVggBlock(3, 8), RepVggBlock(8, 8), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 2))
    for m in model.modules():  # BatchNorm statistics other than the defaults, so folding them is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    model.train()
    fused, blocks = deploy_form(model)
    assert blocks == 2 and fused is not model and not fused.training
    assert model[0].conv_kxk is not None and model.training  # the original keeps its training form
    assert not hasattr(fused[0], "conv_kxk") and fused[0].reparam_conv is not None
    assert count_parameters(fused) < count_parameters(model)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(fused(x), model.eval()(x), atol=1e-5)


def test_deploy_form_leaves_a_model_without_rep_blocks_itself():
    model = create_model(spec())
    assert deploy_form(model) == (model, 0)


def test_weights_that_are_not_a_usable_file_are_refused_by_what_they_are(tmp_path, monkeypatch):
    """A folder was "not found", a hub id "local file ... not found", NaN weights failed at the first step blaming
    the learning rate, and torch.save(model) ended with torch's advice to retry with weights_only=False."""
    src = create_model(spec("test_resnet"))
    with pytest.raises(EdgeKDError, match=r"model.weights .*w: is a folder|is a folder; give the weights file in it"):
        (tmp_path / "w").mkdir()
        create_model(spec("test_resnet"), weights=str(tmp_path / "w"))
    with pytest.raises(EdgeKDError, match=r"model.weights hf-hub:timm/resnet18.a1_in1k: a model hub id, not a local "
                                          r"file; for hub weights set model.pretrained=true"):
        create_model(spec("test_resnet"), weights="hf-hub:timm/resnet18.a1_in1k")
    (tmp_path / "timm").mkdir()
    torch.save(src.state_dict(), tmp_path / "timm" / "w.pth")  # a local file in a folder named timm/ is a file
    monkeypatch.chdir(tmp_path)
    create_model(spec("test_resnet"), weights="timm/w.pth")
    state = src.state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(EdgeKDError, match=r"nan.pth hold NaN or infinite values \(e.g. layer1.0.conv1.weight\)$"):
        create_model(spec("test_resnet"), weights=str(tmp_path / "nan.pth"))
    torch.save(src, tmp_path / "whole.pt")
    with pytest.raises(EdgeKDError, match=r"whole.pt: it holds pickled Python objects \(e.g. torch.save\(model\)\), "
                                          r"not only tensors; save model.state_dict\(\) and give that file$"):
        create_model(spec("test_resnet"), weights=str(tmp_path / "whole.pt"))


def test_freeze_stages_takes_a_vits_own_tokens_with_its_stem():
    """group_modules lists submodules only: a ViT's cls_token and pos_embed (the model's own parameters, in timm's
    stem group) had kept training with patch_embed frozen."""
    from timm.models import group_parameters

    m = create_model(spec("test_vit"))
    freeze(m, stages=1)
    stem = group_parameters(m, m.group_matcher(coarse=True))[0]
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(stem)
    trains = {n for n, p in m.named_parameters() if p.requires_grad}
    assert not trains & set(stem) and "blocks.0.attn.qkv.weight" in trains


def test_a_model_averaging_two_classifiers_gets_both_heads_and_head_lr_on_both():
    """LeViT's output is the mean of `head` and `head_dist`: model.head mlp had replaced `head` only and head_lr had
    left `head_dist` in the backbone group, half of every logit from a plain new Linear at the backbone rate."""
    from edgekd.models import classifier_names, head_parameters

    m = create_model({**spec("levit_128s"), "head": "dropout_linear", "head_dropout": 0.2})
    paths = ["head.linear", "head_dist.linear"]
    assert classifier_names(m) == paths
    for path in paths:
        assert isinstance(m.get_submodule(path), torch.nn.Sequential), path
    heads = {id(p) for p in head_parameters(m)}
    assert heads == {id(p) for path in paths for p in m.get_submodule(path).parameters()}
    with pytest.raises(EdgeKDError, match=r"averages 2 classifiers \(head.linear, head_dist.linear\)"):
        classifier_name(m)  # growing one head (continual) would leave the other's half as it was


def test_a_weights_file_missing_most_parameters_is_refused_whatever_its_tensor_count(tmp_path):
    """A pruned model's file (weight_orig/weight_mask for every conv) misses 14 of 75 tensors but 99% of the
    parameters: BatchNorm's small tensors had kept it under the half-of-the-tensors rule, loaded with a warning."""
    state = create_model(spec("test_resnet")).state_dict()
    pruned = {(k.replace(".weight", ".weight_orig") if v.ndim == 4 else k): v for k, v in state.items()}
    torch.save(pruned, tmp_path / "pruned.pth")
    with pytest.raises(EdgeKDError, match=r"do not fit this architecture: \d+ of its 75 tensors \(9\d.\d% of the "
                                          r"parameters outside the classifier\)"):
        create_model(spec("test_resnet"), weights=str(tmp_path / "pruned.pth"))
