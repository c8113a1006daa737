"""The config: its schema (`schema`), YAML loading with bases and overrides (`loading`), the parts
a cache key hashes (`slices`) and the rules for values without effect (`checks`)."""

from .base import ConfigError
from .checks import device_notes, ineffective_values
from .loading import apply_override, config_tree, deep_merge, load_config
from .members import AuxHeadConfig, HeadConfig, MemberConfig, SEEConfig, TrainConfig, TrainStage
from .schema import (
    CompetitionConfig,
    Config,
    EmbedConfig,
    EnsembleConfig,
    ExportConfig,
    FoldsConfig,
    LabelRerankConfig,
    PenaltyConfig,
    PseudoConfig,
    RetrieveConfig,
    RuntimeConfig,
    VerifyConfig,
)
from .slices import config_slice, member_slice

__all__ = [
    "AuxHeadConfig",
    "CompetitionConfig",
    "Config",
    "ConfigError",
    "EmbedConfig",
    "EnsembleConfig",
    "ExportConfig",
    "FoldsConfig",
    "HeadConfig",
    "LabelRerankConfig",
    "MemberConfig",
    "PenaltyConfig",
    "PseudoConfig",
    "RetrieveConfig",
    "RuntimeConfig",
    "SEEConfig",
    "TrainConfig",
    "TrainStage",
    "VerifyConfig",
    "apply_override",
    "config_slice",
    "config_tree",
    "deep_merge",
    "device_notes",
    "ineffective_values",
    "load_config",
    "member_slice",
]
