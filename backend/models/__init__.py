"""Occupancy networks: encoders, decoders and the registry that builds them from a configuration."""

from .registry import PRESETS, OccupancyNetwork, build_model, preset, validate_config

__all__ = ["PRESETS", "OccupancyNetwork", "build_model", "preset", "validate_config"]
