"""Everything up to a packed batch: the corpus format, writer, reader, ingest, the synthetic
generator, the window index (the global training order) and the data service (Ray Data and
in-process). It knows nothing of the model: batches are made by a tokenizer it is handed. See
docs/corpus-format.md and docs/architecture.md."""
