"""Data stages: drive-log formats, the fleet simulator, real-dataset importers, Spark extraction and
validation. ``frames.Frame`` is the one in-memory record every source produces and every job consumes."""
