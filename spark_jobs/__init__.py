"""Data stages: drive-log formats, the fleet simulator, real-dataset importers, Spark extraction and
validation. ``frames.Frame`` is the one in-memory record every source produces and every job consumes."""

import warnings

# Petastorm 0.12 (pinned: see ../shared/notes/stack.md) uses pyarrow's legacy dataset/filesystem API and
# raises FutureWarnings on every reader and Spark worker; they concern petastorm's code, not ours, and
# drown real output. Only warnings attributed to petastorm's own modules are silenced.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
