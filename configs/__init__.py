"""YAML configuration files and their typed validation (used at entry points only)."""

from configs.schema import STAGES, DATA_STAGES, Config, ConfigError, load_config, validate_overrides

__all__ = ["Config", "ConfigError", "DATA_STAGES", "STAGES", "load_config", "validate_overrides"]
