"""The in-memory records every source produces: one ``LogMeta`` per drive log and a ``Frame`` per sweep.

Coordinates are in the LiDAR sensor frame (x forward, y left, z up, metres) unless said otherwise.
Boxes are float32 arrays of shape (M, 9) with columns ``BOX_COLUMNS``; ``class_id`` is a taxonomy id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BOX_COLUMNS = ("cx", "cy", "cz", "length", "width", "height", "yaw", "class_id", "track_id")
EGO_COLUMNS = ("x", "y", "z", "heading", "speed", "acceleration")  # world frame (m, rad, m/s, m/s^2)
GPS_COLUMNS = ("latitude", "longitude", "altitude")
ROUTE_COLUMNS = ("lane_offset", "lane_heading", "speed_limit")  # m from lane centre, rad, m/s


@dataclass
class LogMeta:
    log_id: str
    vehicle_id: str
    city: str
    start_time_ns: int  # UTC nanoseconds since the epoch; selects the day a log belongs to
    software_version: str
    source: str  # sim | kitti | semantickitti | av2 | mcap


@dataclass
class Frame:
    log_id: str
    frame_index: int
    timestamp_ns: int
    points: np.ndarray  # (N, 4) float32: x, y, z, intensity in [0, 1]
    labels: np.ndarray  # (N,) uint8 taxonomy ids, one per point
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, len(BOX_COLUMNS)), np.float32))
    ego: np.ndarray = field(default_factory=lambda: np.zeros(len(EGO_COLUMNS), np.float64))
    gps: np.ndarray = field(default_factory=lambda: np.full(len(GPS_COLUMNS), np.nan, np.float64))
    route: np.ndarray = field(default_factory=lambda: np.zeros(len(ROUTE_COLUMNS), np.float64))
