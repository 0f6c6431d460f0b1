"""Objectives and losses, configs, EMA, checkpoints and the one Trainer."""
