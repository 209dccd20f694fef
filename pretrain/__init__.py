"""The POYO model and its training: tokenizer, PerceiverIO, attention backends, the Ray Train +
DeepSpeed loop, evaluation and MLflow tracking (issues 3 and 4). The model never sees Zarr, Ray
or MLflow: it takes packed tensors."""
