"""Experiment configs: one file per system, each with get_config(arg)."""
