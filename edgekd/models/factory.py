"""One model factory over timm: create by name, local or hub weights, custom head, stage freezing, size."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import group_parameters
from torch import nn

import edgekd.models.cnn  # noqa: F401  (registers edgekd_cnn with timm)
from edgekd.errors import EdgeKDError, shorten
from edgekd.fileio import sha256_file


def model_spec(model_cfg, num_classes: int, in_chans: int) -> dict[str, Any]:
    """Everything needed to rebuild the architecture (no weights): stored in every checkpoint."""
    return {
        "name": model_cfg.name, "num_classes": num_classes, "in_chans": in_chans,
        "drop_rate": model_cfg.drop_rate, "drop_path_rate": model_cfg.drop_path_rate,
        "head": model_cfg.head, "head_dropout": model_cfg.head_dropout, "head_hidden": model_cfg.head_hidden,
        "kwargs": dict(model_cfg.kwargs),
    }


def check_input_size(model: nn.Module, size: int, name: str, channels: int | None = None) -> None:
    """A timm model with a fixed patch grid (Swin, ViT: `patch_embed.strict_img_size`) refuses another input size
    only at its first forward, with timm's AssertionError; refused here by name, with the kwarg that sets it. Below
    SMALL_INPUT px any model is run once at `size` on `channels` (default: its in_chans, else 3)."""
    embed = getattr(model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    if fixed is not None and getattr(embed, "strict_img_size", False):
        if tuple(fixed) == (size, size):
            return
        window = " and model.kwargs.window_size to fit its stages (e.g. 2 at 32 px)" if "swin" in name else ""
        raise EdgeKDError(f"model {name} takes {fixed[0]}x{fixed[1]} px input (a fixed patch grid) and data.image_size "
                          f"is {size}: set model.kwargs.img_size: {size}{window}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = tuple(cfg.get("input_size", (0, size, size))[1:])
    if cfg.get("fixed_input_size") and default != (size, size):  # LeViT, EfficientFormer: attention-bias grids
        try_one_forward(model, size, name, default, channels)
    elif size < SMALL_INPUT:  # a stage that downsamples past 1 px (ConvNeXt at 16 px) had failed at the first step
        try_one_forward(model, size, name, None, channels)  # with a raw "Kernel size can't be greater than ..."


SMALL_INPUT = 64
"""Below this data.image_size a model is run once at build: one forward there is cheap, and every downsampling
failure of a timm model seen here was below it."""


def try_one_forward(model: nn.Module, size: int, name: str, default: tuple[int, ...] | None,
                    channels: int | None = None) -> None:
    """One forward at `size` of a model timm marks as fixed-size (its `default` size) or of any model at a small
    size (None): its shape error (a RuntimeError deep in the model at the first training step) becomes a one-line
    refusal, naming the kwarg that sets a fixed size."""
    channels = channels or getattr(model, "in_chans", None) or 3  # (edgekd_cnn keeps no in_chans)
    err = forward_error(model, (channels, size, size))
    if err is None:
        return
    detail = shorten(str(err).splitlines()[0], 100) if str(err) else type(err).__name__
    if default is None:
        raise EdgeKDError(f"model {name} fails a forward at {size} px (data.image_size; a stage that "
                          f"downsamples past 1 px, or a fixed grid): give a larger size ({detail})")
    raise EdgeKDError(f"model {name} takes {default[0]}x{default[1]} px input (timm: a fixed input size) and "
                      f"data.image_size is {size}: set model.kwargs.img_size: {size}, if the model takes it "
                      f"({detail})")


def forward_error(model: nn.Module, input_shape: tuple[int, ...]) -> Exception | None:
    """The shape error (RuntimeError, AssertionError, ValueError) of one eval-mode forward of a zero image of
    `input_shape` (C, H, W), or None when the model takes it; its train/eval mode is left as it was. Callers name
    the setting that chose the size (data.image_size, an export profile's input_size, distill.teacher_image_size)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except (RuntimeError, AssertionError, ValueError) as err:
        return err
    finally:
        model.train(was_training)
    return None


def create_model(spec: dict[str, Any], pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """Build a timm model from a spec; pretrained from the hub or from a local weights file; replace the head."""
    name = spec["name"]
    if name not in timm.list_models() and not timm.is_model(name):
        raise EdgeKDError(f"model.name: unknown timm model '{name}'")
    kwargs = dict(spec.get("kwargs") or {})
    if spec.get("drop_path_rate") is not None:
        kwargs["drop_path_rate"] = spec["drop_path_rate"]
    if weights:
        refuse_weights_path(name, weights)
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    if pretrained and not weights and timm.models.get_pretrained_cfg(name) is None:  # e.g. the edgekd_cnn models
        raise EdgeKDError(f"model '{name}' has no weights on the model hub: give model.weights=FILE (a state dict or "
                          "an edgekd checkpoint of the same model), or model.pretrained=false")
    where = f"local file {weights}" if weights else "the model hub (is there network?)"
    try:
        with _missing_keys_log() as missing, _quiet_hub_retries():
            model = timm.create_model(name, pretrained=pretrained, num_classes=spec["num_classes"],
                                      in_chans=spec["in_chans"], drop_rate=spec.get("drop_rate", 0.0), **kwargs)
    except TypeError as err:  # drop_path_rate comes from model.drop_path_rate, not model.kwargs
        key = "model.drop_path_rate" if "drop_path_rate" in str(err) else "model.kwargs"
        clear = ("--set model.drop_path_rate=null" if key == "model.drop_path_rate" else
                 "--set 'model.kwargs={}' clears the recipe's, for another model" if spec.get("kwargs") else "")
        raise EdgeKDError(f"model '{name}': bad {key} ({err}{'; ' + clear if clear else ''})") from None
    except Exception as err:  # an empty, truncated or foreign weights file fails in many ways (EOFError, KeyError...)
        if pretrained:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # "Error(s) in ...:" + the first
            detail = f"{type(err).__name__}: {shorten(' '.join(lines[:2]), 160)}" if lines else "unreadable"
            if "weights_only" in str(err):  # torch's advice (weights_only=False) is not an option edgekd offers
                detail = ("it holds pickled Python objects (e.g. torch.save(model)), not only tensors; save "
                          "model.state_dict() and give that file")
            fix = "" if weights else " (offline: --set model.pretrained=false, or model.weights=FILE)"
            raise EdgeKDError(f"model '{name}': could not load pretrained weights from {where}: {detail}{fix}") from None
        if isinstance(err, (OSError, RuntimeError, ValueError)):
            raise EdgeKDError(f"model '{name}': {shorten(str(err).splitlines()[0], 160)}") from None
        raise
    if pretrained:
        _check_weights_loaded(model, missing, name, where)
        bad = next((k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
                   None)
        if bad is not None:  # training would fail at its first step, blaming the learning rate
            raise EdgeKDError(f"model '{name}': the pretrained weights from {where} hold NaN or infinite values "
                              f"(e.g. {bad})")
    replace_head(model, spec.get("head", "linear"), spec.get("head_dropout", 0.0), spec.get("head_hidden", 256))
    return model


def hub_weights(name: str) -> dict[str, Any]:
    """Which hub weights timm loads for `name`, for a checkpoint's provenance: the name, and when huggingface_hub's
    cache holds the file (it does once create_model has loaded them): the hub repository, its revision (the
    snapshot's commit), the file and its sha256. A name alone does not pin weights: the hub repository can be
    updated, and a tagless name follows timm's default tag."""
    record: dict[str, Any] = {"hub": name}
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return record
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = cfg.hf_hub_id.partition("@")
    record["repo"] = repo
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(
        filename, filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
    for filename in [f for f in (safe, filename) if f]:  # timm's order: the safetensors file first
        cached = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str) and Path(cached).is_file():
            snapshot = Path(cached).parent
            commit = snapshot.name if snapshot.parent.name == "snapshots" else None
            return {**record, "revision": commit, "filename": filename, "sha256": sha256_file(cached)}
    return record


def refuse_weights_path(name: str, weights: str | Path) -> None:
    """model.weights must be a local file: a hub id, a folder or a missing path is refused naming which."""
    if Path(weights).is_file():
        return
    if str(weights).startswith(("hf-hub:", "hf_hub:", "timm/")):
        raise EdgeKDError(f"model.weights {weights}: a model hub id, not a local file; for hub weights set "
                          f"model.pretrained=true with a timm name (e.g. {name} or {name}.<tag>) and no model.weights")
    if Path(weights).is_dir():
        raise EdgeKDError(f"model '{name}': model.weights {weights} is a folder; give the weights file in it")
    raise EdgeKDError(f"model '{name}': could not load pretrained weights from local file {weights}: not found")


@contextlib.contextmanager
def _quiet_hub_retries():
    """Without network huggingface_hub logs each retry of each file (about 24 lines for one model) before the
    download fails; the failure is then edgekd's one line, so the retries are not shown."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


class _MissingKeys:
    """Stands in for timm's builder logger during a model build: hears the parameter names timm reports missing
    after loading pretrained weights, and passes every call on to the real logger (so logging settings, disabled
    or not, apply to what is printed as before; the check does not depend on them)."""

    def __init__(self, real: logging.Logger) -> None:
        self.real, self.keys = real, []

    def info(self, msg, *args, **kwargs) -> None:
        text = str(msg) % args if args else str(msg)
        match = re.match(r"Missing keys \((.*)\) discovered while loading", text)
        if match:
            self.keys += [k.strip() for k in match.group(1).split(",") if k.strip()]
        self.real.info(msg, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


@contextlib.contextmanager
def _missing_keys_log():
    """timm loads pretrained weights non-strictly when the head is replaced and logs the keys it did not find;
    this hears that log call for the duration of a model build."""
    from timm.models import _builder

    real = _builder._logger
    _builder._logger = handler = _MissingKeys(real)
    try:
        yield handler
    finally:
        _builder._logger = real


def _check_weights_loaded(model: nn.Module, missing: _MissingKeys, name: str, where: str) -> None:
    """Most tensors outside the classifier must have come from the weights: a file for another architecture would
    otherwise leave the model at its random initialisation, silently. timm's own adaptations stay allowed: a
    dropped classifier, a stem it could not convert to other input channels, a few tensors that `model.kwargs`
    add (e.g. register tokens)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    stem = f"{cfg['first_conv']}.weight" if isinstance(cfg.get("first_conv"), str) else None

    def in_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    # BatchNorm fills in a missing num_batches_tracked itself (older checkpoints lack it): never reported missing.
    body = [k for k in model.state_dict() if not in_head(k) and not k.endswith("num_batches_tracked")]
    unloaded = [k for k in missing.keys if not in_head(k) and k != stem]
    source = "the model hub" if where.startswith("the model hub") else where
    state = model.state_dict()
    share = sum(state[k].numel() for k in unloaded if k in state) / max(sum(state[k].numel() for k in body), 1)
    # by tensors or by parameters: BatchNorm's four small tensors per conv had let a file without any conv weight
    # (a pruned model's weight_orig/weight_mask) load with a warning, 99% of the backbone random
    if body and (len(unloaded) > len(body) / 2 or share > 0.5):
        raise EdgeKDError(f"model '{name}': the pretrained weights from {source} do not fit this architecture: "
                          f"{len(unloaded)} of its {len(body)} tensors ({share:.1%} of the parameters outside the "
                          f"classifier) are not in them (e.g. {unloaded[0]})")
    if unloaded:  # a file of part of the model (a layer dropped): its values stay random, which had gone unsaid
        warnings.warn(f"model '{name}': {len(unloaded)} of its {len(body)} tensors ({share:.1%} of the parameters "
                      f"outside the classifier) are not in the weights from {source} and stay randomly initialised "
                      f"(e.g. {', '.join(unloaded[:3])})", stacklevel=2)


def classifier_names(model: nn.Module) -> list[str]:
    """Attribute paths of the model's classifiers, from timm's config: one ('fc', 'head.fc', 'classifier', ...),
    or two for the models whose output is the mean of two heads (LeViT, EfficientFormer, distilled DeiT: `head`
    and `head_dist`)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = [names] if isinstance(names, str) else list(names or [])
    if not names:
        raise EdgeKDError(f"{type(model).__name__}: cannot find the classifier layer")
    return names


def classifier_name(model: nn.Module) -> str:
    """Attribute path of the final classifier; a model with two (`classifier_names`) is refused: replacing or
    growing one of them would leave the other's half of every logit as it was."""
    names = classifier_names(model)
    if len(names) > 1:
        raise EdgeKDError(f"{type(model).__name__} averages {len(names)} classifiers ({', '.join(names)}): its head "
                          "cannot be grown or expanded here (use model.head linear, or a model with one classifier)")
    return names[0]


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):  # paths name the model, not its DDP wrapper
        model = model.module
    try:
        return model.get_submodule(path)
    except AttributeError:
        parent = path.rpartition(".")[0]
        try:  # the modules beside the missing one (get_submodule("") is the model), so the fix is in the message
            scope = model.get_submodule(parent)
        except AttributeError:
            parent, scope = "", model
        known = [n for n, _ in scope.named_children()]
        where = f"'{parent}' has" if parent else "its top level has"
        raise EdgeKDError(f"{type(model).__name__} has no module '{path}' ({where} {', '.join(known[:12]) or 'none'}"
                          f"{', ...' if len(known) > 12 else ''})") from None


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def replace_head(model: nn.Module, kind: str, dropout: float, hidden: int) -> None:
    """linear: timm's own; dropout_linear: Dropout + Linear; mlp: Linear-ReLU-Dropout-Linear."""
    if kind == "linear":
        return
    for path in classifier_names(model):  # each of a two-head model's (LeViT's head and head_dist): one had stayed
        old = get_submodule(model, path)
        if not isinstance(old, nn.Linear):
            raise EdgeKDError(f"model.head={kind} needs a Linear classifier, found {type(old).__name__} at '{path}'")
        cin, cout = old.in_features, old.out_features
        if kind == "dropout_linear":
            new = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, cout))
        else:
            new = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(hidden, cout))
        set_submodule(model, path, new)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every classifier's parameters (a two-head model's both: head_lr for each)."""
    return [p for path in classifier_names(model) for p in get_submodule(model, path).parameters()]


def freeze(model: nn.Module, stages: int = 0, patterns: list[str] | None = None) -> int:
    """Freeze the first `stages` parameter groups (timm's coarse group_matcher: stem, stage 1, ...) and every
    parameter whose name matches a regex in `patterns`. Returns the number of frozen parameters."""
    frozen_prefixes: list[str] = []
    if stages:
        if not hasattr(model, "group_matcher"):
            raise EdgeKDError(f"{type(model).__name__}: no group_matcher, freeze by model.freeze_patterns instead")
        # by parameter name: a ViT's cls_token and pos_embed are the model's own parameters, in the stem group but
        # under no submodule, and module groups had left them training
        groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
        if stages >= len(groups):  # the last group is the classifier: an optimizer of no parameter had followed
            raise EdgeKDError(f"model.freeze_stages {stages}: {type(model).__name__} has {len(groups)} parameter "
                              f"groups, the last one its classifier; freeze at most {len(groups) - 1}")
        for names in groups[:stages]:
            frozen_prefixes += names
    regexes = [re.compile(p) for p in patterns or []]
    count, matched = 0, set()
    for name, p in model.named_parameters():
        hits = [r.pattern for r in regexes if r.search(name)]
        matched.update(hits)
        if hits or any(name == q or name.startswith(q + ".") for q in frozen_prefixes):
            p.requires_grad_(False)
            count += p.numel()
    missed = [r.pattern for r in regexes if r.pattern not in matched]
    if missed:  # a typo had frozen nothing, without a word
        example = next(iter(dict(model.named_parameters())), "")
        raise EdgeKDError(f"model.freeze_patterns: '{missed[0]}' matches no parameter of {type(model).__name__} "
                          f"(names look like '{example}')")
    if not any(p.requires_grad for p in model.parameters()):
        raise EdgeKDError("model.freeze_stages/freeze_patterns freeze every parameter: nothing would train")
    return count


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch.utils.flop_counter FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


DEPLOY_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")
"""Methods by which timm's re-parameterizable blocks (RepVGG/MobileOne/FastViT/RepViT branches, LeViT conv+BN)
turn into their inference form (timm.utils.reparameterize_model calls them)."""


def deploy_form(model: nn.Module) -> tuple[nn.Module, int]:
    """(the model as it should run at inference, how many blocks were fused). A model with re-parameterizable
    blocks comes back as a fused copy (`timm.utils.reparameterize_model`: multi-branch convolutions folded into
    one, BatchNorm into its convolution), in eval mode; any other model comes back itself, untouched. The copy
    computes the same function up to float rounding: the export's parity gate checks it against `model`."""
    outer: list[str] = []  # blocks with a hook not inside another such block (timm fuses the outer one whole)
    for name, m in model.named_modules():
        if name and any(callable(getattr(m, hook, None)) for hook in DEPLOY_HOOKS) \
                and not any(name.startswith(o + ".") for o in outer):
            outer.append(name)
    fusable = len(outer)
    if not fusable:
        return model, 0
    from timm.utils.model import reparameterize_model

    try:
        with torch.no_grad():
            fused = reparameterize_model(copy.deepcopy(model).eval(), inplace=True)
    except Exception as err:  # a third-party block's fuse()
        raise EdgeKDError(f"could not fuse {type(model).__name__}'s re-parameterizable blocks ({type(err).__name__}: "
                          f"{shorten(str(err))}); `fuse: false` in the export profile exports the training form") from None
    return fused, fusable
