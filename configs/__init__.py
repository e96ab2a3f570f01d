"""YAML configuration files and their typed validation (used at entry points only)."""

from configs.schema import Config, ConfigError, load_config, validate_overrides

__all__ = ["Config", "ConfigError", "load_config", "validate_overrides"]
