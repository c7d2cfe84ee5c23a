"""Drive-log sources: each module lists one kind of log and reads it as ``LogMeta`` + ``Frame``s."""
