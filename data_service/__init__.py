"""Everything up to a packed batch: the corpus format, writer, reader, ingest, the synthetic
generator and (next) the window index and the Ray data service. See docs/corpus-format.md."""
