"""Models: the timm factory, heads, freezing, the custom CNN baseline, parameter and MAC counts."""

from edgekd.models.factory import (classifier_name, count_macs, count_parameters, create_model, freeze,
                                   get_submodule, head_parameters, model_spec, replace_head, set_submodule)

__all__ = ["classifier_name", "count_macs", "count_parameters", "create_model", "freeze", "get_submodule",
           "head_parameters", "model_spec", "replace_head", "set_submodule"]
