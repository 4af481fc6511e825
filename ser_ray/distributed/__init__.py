"""Everything that touches Ray: resources, Train edge, ingest, fold trainer, TAPT, feature pipeline
and cache, console."""
