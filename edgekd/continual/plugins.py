"""The continual plug-in registry: each `continual.<key>` section of a recipe that is set builds its plug-in (the
pattern of the KD loss-term registry, edgekd.distill.losses), so the strategies combine freely."""

from __future__ import annotations

from typing import Any, Callable

from edgekd.continual.base import ContinualPlugin
from edgekd.continual.bn_freeze import BNFreezePlugin
from edgekd.continual.ewc import EWCPlugin
from edgekd.continual.lwf import LwFPlugin
from edgekd.continual.replay import ReplayPlugin

PLUGINS: dict[str, Callable[[Any, int], ContinualPlugin]] = {}
"""continual.<key> -> builder(section, seed). Plug-ins are built, and their hooks run, in registration order."""


def register_plugin(key: str):
    def deco(builder):
        PLUGINS[key] = builder
        return builder
    return deco


@register_plugin("bn_freeze")
def _build_bn_freeze(section: bool, seed: int) -> ContinualPlugin:
    return BNFreezePlugin()


@register_plugin("ewc")
def _build_ewc(section, seed: int) -> ContinualPlugin:
    return EWCPlugin(section.weight, section.online, section.gamma, section.fisher_samples, seed)


@register_plugin("lwf")
def _build_lwf(section, seed: int) -> ContinualPlugin:
    return LwFPlugin(section.alpha, section.temperature)


@register_plugin("replay")
def _build_replay(section, seed: int) -> ContinualPlugin:
    return ReplayPlugin(section.size, section.selection, section.batch_size, seed)


def build_plugins(cfg, seed: int) -> list[ContinualPlugin]:
    """The plug-ins of a recipe's continual section: one per registered key whose section is set."""
    return [build(getattr(cfg, key), seed) for key, build in PLUGINS.items() if getattr(cfg, key)]
