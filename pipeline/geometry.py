"""Box geometry shared by the importers, the simulator and evaluation: points inside oriented 3D boxes."""

from __future__ import annotations

import numpy as np


def points_in_boxes(xyz: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Index of the box each point falls in (the first one, in box order), or -1.

    ``boxes`` has columns cx, cy, cz, length, width, height, yaw (yaw about +z, length along the box's
    heading); a point on a face counts as inside. Vectorised over points, looped over boxes (few).
    """
    owner = np.full(len(xyz), -1, dtype=np.int64)
    for i, (cx, cy, cz, length, width, height, yaw) in enumerate(np.asarray(boxes, np.float64)[:, :7]):
        dx, dy, dz = xyz[:, 0] - cx, xyz[:, 1] - cy, xyz[:, 2] - cz
        c, s = np.cos(yaw), np.sin(yaw)
        local_x = c * dx + s * dy
        local_y = -s * dx + c * dy
        inside = (np.abs(local_x) <= length / 2) & (np.abs(local_y) <= width / 2) & (np.abs(dz) <= height / 2)
        owner[inside & (owner < 0)] = i
    return owner
