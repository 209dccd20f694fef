"""Kept for model versions registered before pretrain/ was split into sub-packages: MLflow copied
their pyfunc module, which imports `PackedBatch` from here. New code imports
pretrain.model.batch."""

from .model.batch import PackedBatch

__all__ = ["PackedBatch"]
