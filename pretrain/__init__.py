"""The POYO model and its training: tokenizer, packed batches, the PerceiverIO and its attention
backends, the run plan, the training loop and its parts (step, evaluation, checkpoints, metrics
sinks), the Ray Train + DeepSpeed launcher, and MLflow tracking and registry. The model never
sees Zarr, Ray or MLflow: it takes packed tensors. Layout: docs/architecture.md."""
