"""LoRAtorio's host-independent core: pure PyTorch and the standard library, never a WebUI module."""

from loratorio.core.adapters import (
    Adapter,
    Bias,
    Callback,
    Chain,
    Dense,
    LoHa,
    LoKr,
    LowRank,
    Materialized,
    NormDelta,
    Rescaled,
    merged_weight,
    probe,
    tucker,
)
from loratorio.core.engine import BatchLayout, Composer, FastRules
from loratorio.core.evaluate import evaluate, tree_map, tree_repeat
from loratorio.core.fusion import (
    compose,
    patch_similarity,
    patch_weights,
    recentre_uncond,
    softmin_weights,
    to_eps,
    weighted_sum,
)
from loratorio.core.lora_file import adapters_for_model, kohya_name, to_adapter, to_state_dict
from loratorio.core.masked import RowMasks
from loratorio.core.memory import (
    VALUES_PER_PIXEL,
    Chunker,
    MemoryBudget,
    activation_peak,
    is_out_of_memory,
)
from loratorio.core.modes import MODES, in_window, mode_recentre, mode_weights, switch_index
from loratorio.core.routing import MultiAdapter, RoutingSlot, RowRouting
from loratorio.core.settings import ARG_ORDER, Settings, SettingsError, settings_from_args

__all__ = [
    "ARG_ORDER", "MODES", "Adapter", "adapters_for_model", "BatchLayout", "Bias", "Callback", "Chain", "compose",
    "Composer", "Dense", "evaluate", "FastRules", "in_window", "kohya_name", "LoHa", "LoKr", "LowRank", "Materialized",
    "merged_weight", "mode_recentre", "mode_weights", "MultiAdapter", "NormDelta", "patch_similarity",
    "patch_weights", "probe", "recentre_uncond", "Rescaled", "RoutingSlot", "RowMasks", "RowRouting", "Settings",
    "SettingsError", "settings_from_args", "softmin_weights", "switch_index", "to_adapter", "to_eps", "to_state_dict",
    "tree_map", "tree_repeat", "tucker", "weighted_sum",
    "activation_peak", "Chunker", "is_out_of_memory", "MemoryBudget", "VALUES_PER_PIXEL",
]
