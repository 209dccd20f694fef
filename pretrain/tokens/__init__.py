"""From corpus windows to what the model reads and is scored on: the tokenizer (windows ->
PackedBatch through the model's vocabularies) and its configuration (config.py), per-session
target statistics, and label budgets (which part of a session's train split carries labels).
Imports data_service and pretrain.model."""
