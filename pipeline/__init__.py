"""The pipeline's spine: typed config, the pipeline home, provenance, the artifact registry and the CLI.

Nothing in here imports a stage; every stage leans on this package.
"""

__version__ = "0.1.0"
