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

from serving.package import PackageError, verify_package
from serving.runtime import InvalidInput, ServingModel, load

__all__ = ["InvalidInput", "PackageError", "ServingModel", "load", "verify_package"]
