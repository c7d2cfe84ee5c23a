"""Drive-log sources: each module lists one kind of log, reads it as ``LogMeta`` + ``Frame``s and registers
itself as an ``Importer`` under its source name (``spark_jobs.sources.registry``)."""
