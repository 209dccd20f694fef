"""Kept for model versions registered before pretrain/ was split into sub-packages: MLflow copied
their pyfunc module, which imports `load_exported` from here. New code imports
pretrain.tracking.registry."""

from .tracking.export import load_exported

__all__ = ["load_exported"]
