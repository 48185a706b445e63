"""Sequence models, walk-forward evaluation, backtest and registry."""
