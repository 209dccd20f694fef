"""One training run: its config, the plan (data resolved once on the driver), the loop and its
parts (engine, optimizer, checkpoints, sinks, hooks), the Ray Train and in-process runners, and
the pretraining driver. Imports every layer below it (tracking, decoding, tokens, model)."""
