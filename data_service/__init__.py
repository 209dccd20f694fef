"""Everything up to a packed batch: the corpus format, writer, reader, ingest, the synthetic
generator, the window index (the global training order) and the data service (a batch read and
packed as a whole: batch.py; in process, in a pool of Ray actors, or through Ray Data). It knows nothing of the model: batches are made by a tokenizer it is handed. See
docs/corpus-format.md and docs/architecture.md."""
