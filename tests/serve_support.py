"""Set-up shared by the signal-service tests."""

from models.untrained import EAGER_THRESHOLDS, MODEL_NAME, register_model

__all__ = ["EAGER_THRESHOLDS", "MODEL_NAME", "register_model"]
