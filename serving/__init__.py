"""The ``serve`` stage: a blessed model -> a verified, self-describing package -> C++, Python and HTTP.

    import serving
    model = serving.load("path/to/package")        # or the package's .tar.gz
    classes = model.predict(points)                 # points: (N, 4) float32 -> classes: (N,) int64
    model.metadata.class_map, model.metadata.model["ref"]

``serving.package`` builds and verifies packages, ``serving.runtime`` loads them, ``serving.entry`` is
the stage (``avp serve``), ``serving.http`` the FastAPI server (``avp serve-http``) and ``serving/cpp``
the LibTorch consumer. See docs/serving.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names, loaded on first use: ``import serving.artifacts`` (what evaluate times) then does not
# pull in the package builder and the runtime, so evaluate's content key does not cover code it never runs.
_PUBLIC = {"InvalidInput": "serving.runtime", "ServingModel": "serving.runtime", "load": "serving.runtime",
           "PackageError": "serving.package", "verify_package": "serving.package"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
