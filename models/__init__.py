"""Sequence models, walk-forward evaluation, backtest and registry (see issue 3)."""
