"""Models: the timm factory, heads, freezing, the custom CNN baseline, parameter and MAC counts, feature taps."""

from edgekd.models.factory import (check_input_size, classifier_name, classifier_names, count_macs, count_parameters, create_model,
                                   deploy_form, forward_error, freeze, get_submodule, head_parameters, hub_weights, model_spec,
                                   replace_head, set_submodule)
from edgekd.models.taps import capture_features, channels_of, resolve_layout, to_map, tokens_to_map

__all__ = ["capture_features", "channels_of", "check_input_size", "classifier_name", "classifier_names", "count_macs", "count_parameters",
           "create_model", "deploy_form", "forward_error", "freeze", "get_submodule", "head_parameters", "hub_weights", "model_spec", "replace_head",
           "resolve_layout", "set_submodule", "to_map", "tokens_to_map"]
