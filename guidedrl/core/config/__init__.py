"""The config tree (pydantic), recipe files and overrides. Everything a run can set lives here;
the rest of the package reads these typed nodes, never raw dicts."""

from __future__ import annotations

from guidedrl.core.config.algo import (  # noqa: F401
    GRPOAdvantage, RLOOAdvantage, ReinforcePPAdvantage, LitePPOAdvantage, AmplifiedAdvantage, GAEAdvantage,
    AdvantageConfig, OffPolicyWeight, PolicyLoss, PPOClipLoss, ReinforceLoss, NFTLoss, PACSLoss, ROVERLoss,
    LossConfig, ReduceConfig, KLConfig, DynamicSampling, ValueConfig, CalibrationConfig, TermConfig, AlgoConfig,
)
from guidedrl.core.config.guidance import (  # noqa: F401
    Trigger, Prefix, Schedule, Teacher, SFTStage, Members, PromptHint, ResponsePrefix, Replace, Refine,
    GuideCompletes, Auxiliary, NoInjection, GuidanceConfig, Switch,
)
from guidedrl.core.config.tree import (  # noqa: F401
    TinyModel, Lora, ModelConfig, FieldMap, DataSource, DataConfig, RolloutConfig, RewardTerm, RewardConfig,
    Overlong, TrainConfig, EvalConfig, RunConfig, Config,
)
from guidedrl.core.config.base import Strict  # noqa: F401
from guidedrl.core.config.files import RECIPES_DIR, apply_overrides, load_yaml, parse_override, recipe_path  # noqa: F401
from guidedrl.core.config.load import dump_config, load_config, validate  # noqa: F401
