"""The fleet simulator: deterministic drive logs of a spinning LiDAR on a car driving down a city street.

Pure numpy. ``fleet_plan`` decides which logs the fleet recorded (city, day, vehicle); ``simulate_log``
builds one log's street and replays it at 10 Hz. A log's bytes depend only on ``(cfg.seed, log id)``
(and the sensor settings in ``cfg``): every random stream is seeded from a sha256 of those, never from
Python's salted ``hash`` or shared global state, so a log is the same alone, in a fleet, in any order and
in any worker process.

The world (see docs/simulator.md for the full picture):

* **Street frame** ``(s, t, z)``: a straight street along ``s``, ``t`` to its left, ``z`` up, the road
  surface at ``z = 0``. Right-hand traffic: lanes driving towards ``+s`` lie at ``t < 0``. Out from the
  centre line: median, travel lanes (3.5 m), bike lane or shoulder, parking lane, curb, sidewalk (a
  furniture band with poles and street trees, then walking lanes), front yards, buildings or walls.
* **World frame**: a local east-north-up tangent plane at the city origin. Each log's street starts at a
  random place within a few km of the origin, on the city's street grid (one of four headings), so logs
  of one city cover many different GeoSplit cells.
* **Sensor**: ``cfg.beams`` beams with elevations evenly spread over -25..+3 degrees, ``cfg.azimuth_steps``
  columns per turn, mounted 1.8 m above the road on the ego car. Each ray returns at most one point:
  the nearest surface hit within ``cfg.max_range_m``, with gaussian range noise and random dropouts.
  A whole sweep is taken at one instant (no rolling shutter, no motion distortion).

Ray casting is vectorised over rays: each primitive (ground plane, oriented box, vertical cylinder,
sphere) is intersected in closed form with the block of rays that can see it (its azimuth and elevation
extent, computed exactly from its corners or bounding circle), and a z-buffer keeps the nearest hit. The
Python loop runs over the ~50-150 primitives in range, never over rays.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

from pipeline.config import SimulateConfig
from pipeline.frames import BOX_COLUMNS, Frame, LogMeta
from pipeline.taxonomy import CLASS_ID

SOURCE = "sim"
FRAME_PERIOD_NS = 100_000_000  # 10 Hz
FRAME_PERIOD_S = FRAME_PERIOD_NS / 1e9
SENSOR_HEIGHT_M = 1.8  # LiDAR origin above the road; the ego pose is the point on the road below it
BEAM_ELEVATION_DEG = (-25.0, 3.0)  # lowest and highest beam
LANE_WIDTH_M = 3.5
EARTH_RADIUS_M = 6_378_137.0  # WGS84 equatorial radius, for the local tangent-plane conversion
LOG_SPREAD_M = 6_000.0  # a log's street starts within this many metres (per axis) of the city origin
EGO_SIZE_M = (4.6, 1.9)  # the ego car's footprint, so crossing pedestrians keep out of its way
MIN_HIT_M = 0.05  # hits closer than this are the sensor housing, not the world
SCENE_MARGIN_M = 20.0  # objects are generated this far beyond where the sensor can reach

GROUND, BUILDING, VEGETATION, POLE = (CLASS_ID[c] for c in ("ground", "building", "vegetation", "pole"))
VEHICLE, PEDESTRIAN, CYCLIST = (CLASS_ID[c] for c in ("vehicle", "pedestrian", "cyclist"))

# Reflectivity ranges (uniform low, high) per class; a point's intensity is its surface's reflectivity,
# dimmed with range, plus a little noise. Signs on poles are retroreflective.
REFLECTIVITY = {
    BUILDING: (0.25, 0.6), VEGETATION: (0.2, 0.4), POLE: (0.45, 0.65), VEHICLE: (0.3, 0.85),
    PEDESTRIAN: (0.12, 0.4), CYCLIST: (0.25, 0.55),
}
SIGN_REFLECTIVITY = (0.85, 1.0)
ASPHALT, CONCRETE, TERRAIN, PAINT = 0.12, 0.32, 0.2, 0.7  # ground materials, by where on the street


@dataclass(frozen=True)
class CityProfile:
    """How one city's streets look and how busy they are.

    Densities are counts per 100 m of street (per lane, per bike lane or per side of the street, as the
    name says); ``(low, high)`` pairs are uniform ranges.
    """

    name: str
    code: str  # three letters, used in vehicle ids
    kind: str  # one line for reports and docs
    origin_lat: float
    origin_lon: float
    origin_alt: float
    grid_heading_deg: float  # the street grid's heading, degrees counter-clockwise from east
    lanes_per_direction: int
    median_m: float
    median_barrier: bool  # a concrete barrier (label building) along the median
    bike_lane_m: float  # bike lane or shoulder between the travel lanes and the parking lane
    parking_lane_m: float
    sidewalk_m: float
    speed_limit_mps: float
    ego_speed_mps: tuple[float, float]
    vehicle_speed_mps: tuple[float, float]
    vehicles_per_100m: float  # moving traffic, per lane
    truck_share: float  # share of moving vehicles that are trucks or buses
    parked_per_100m: float  # per side
    cyclists_per_100m: float  # per bike lane
    walkers_per_100m: float  # per side
    standing_per_100m: float  # per side; only where the sidewalk has room for a standing lane
    crosswalk_spacing_m: float  # 0: no crosswalks
    crossers_per_crosswalk: float
    poles_per_100m: float  # per side, in the furniture band by the curb
    street_trees_per_100m: float  # per side, in the furniture band by the curb
    yard_trees_per_100m: float  # per side, between the sidewalk and the buildings
    bushes_per_100m: float  # per side, between the sidewalk and the buildings
    hedge_share: float  # share of the property line (sidewalk's outer edge) lined with hedges
    building_setback_m: tuple[float, float]
    building_frontage_m: tuple[float, float]
    building_gap_m: tuple[float, float]
    building_height_m: tuple[float, float]
    building_depth_m: tuple[float, float]


CITIES: dict[str, CityProfile] = {
    # Financial-district grid: tall continuous facades on the sidewalk, crowded sidewalks and crosswalks,
    # bike lanes, parked cars, slow traffic.
    "sanfrancisco": CityProfile(
        name="sanfrancisco", code="sfo", kind="dense downtown: tall buildings, many pedestrians and cyclists",
        origin_lat=37.7897, origin_lon=-122.3989, origin_alt=16.0, grid_heading_deg=45.0,
        lanes_per_direction=2, median_m=0.3, median_barrier=False, bike_lane_m=1.6, parking_lane_m=2.2,
        sidewalk_m=4.6, speed_limit_mps=11.2, ego_speed_mps=(5.5, 9.0), vehicle_speed_mps=(5.0, 10.0),
        vehicles_per_100m=3.5, truck_share=0.08, parked_per_100m=7.0, cyclists_per_100m=3.0,
        walkers_per_100m=20.0, standing_per_100m=10.0, crosswalk_spacing_m=70.0, crossers_per_crosswalk=3.0,
        poles_per_100m=4.0, street_trees_per_100m=2.0, yard_trees_per_100m=0.0, bushes_per_100m=0.0, hedge_share=0.0,
        building_setback_m=(0.0, 0.6), building_frontage_m=(12.0, 35.0), building_gap_m=(0.0, 2.0),
        building_height_m=(12.0, 60.0), building_depth_m=(15.0, 30.0),
    ),
    # Leafy suburb: detached houses behind front yards with trees and bushes, cars parked along the curb,
    # a few people walking, light traffic.
    "atlanta": CityProfile(
        name="atlanta", code="atl", kind="suburb: houses behind yards, trees and bushes, parked cars",
        origin_lat=33.7748, origin_lon=-84.2963, origin_alt=315.0, grid_heading_deg=0.0,
        lanes_per_direction=1, median_m=0.3, median_barrier=False, bike_lane_m=1.5, parking_lane_m=2.2,
        sidewalk_m=2.4, speed_limit_mps=11.2, ego_speed_mps=(8.0, 11.0), vehicle_speed_mps=(7.0, 12.0),
        vehicles_per_100m=1.5, truck_share=0.03, parked_per_100m=4.0, cyclists_per_100m=0.8,
        walkers_per_100m=2.0, standing_per_100m=0.0, crosswalk_spacing_m=160.0, crossers_per_crosswalk=0.6,
        poles_per_100m=2.0, street_trees_per_100m=6.0, yard_trees_per_100m=8.0, bushes_per_100m=14.0, hedge_share=0.6,
        building_setback_m=(7.0, 12.0), building_frontage_m=(10.0, 16.0), building_gap_m=(6.0, 14.0),
        building_height_m=(5.0, 8.5), building_depth_m=(10.0, 14.0),
    ),
    # Expressway-like arterial: three lanes each way behind a median barrier, heavy traffic with trucks,
    # sound walls, an embankment with trees, almost nobody on foot.
    "dallas": CityProfile(
        name="dallas", code="dfw", kind="highway-like arterial: many vehicles and trucks, sound walls, few pedestrians",
        origin_lat=32.9258, origin_lon=-96.7750, origin_alt=190.0, grid_heading_deg=0.0,
        lanes_per_direction=3, median_m=2.0, median_barrier=True, bike_lane_m=2.5, parking_lane_m=0.0,
        sidewalk_m=2.0, speed_limit_mps=15.6, ego_speed_mps=(11.0, 14.5), vehicle_speed_mps=(10.0, 15.0),
        vehicles_per_100m=6.0, truck_share=0.2, parked_per_100m=0.0, cyclists_per_100m=0.3,
        walkers_per_100m=0.3, standing_per_100m=0.0, crosswalk_spacing_m=0.0, crossers_per_crosswalk=0.0,
        poles_per_100m=3.0, street_trees_per_100m=0.0, yard_trees_per_100m=5.0, bushes_per_100m=6.0, hedge_share=0.15,
        building_setback_m=(5.0, 8.0), building_frontage_m=(15.0, 30.0), building_gap_m=(0.0, 6.0),
        building_height_m=(3.5, 5.0), building_depth_m=(0.4, 0.5),
    ),
}

# Actor sizes (length, width, height) as uniform ranges.
CAR_SIZE = ((4.2, 5.0), (1.75, 2.0), (1.45, 1.75))
TRUCK_SIZE = ((7.0, 10.0), (2.4, 2.55), (3.0, 3.8))
PEDESTRIAN_SIZE = ((0.5, 0.65), (0.5, 0.65), (1.55, 1.9))
CYCLIST_SIZE = ((1.7, 1.9), (0.55, 0.65), (1.6, 1.8))
VEHICLE_SLOT_M = 14.0  # traffic is laid out in slots this long: no two cars can overlap in a lane
VEHICLE_GAP_M = 2.0
PARKED_SLOT_M = 6.5
CYCLIST_SLOT_M = 4.0
WALKER_SLOT_M = 2.0
STANDING_SLOT_M = 1.5
FURNITURE_SLOT_M = 5.0
WALK_LANE_SPACING_M = 0.8  # sidewalk walking lanes; wider than a pedestrian so lanes never touch


# ------------------------------------------------------------------------------------ randomness
def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from a sha256 of ``parts``: the same parts give the same stream in any process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


# ------------------------------------------------------------------------------------ fleet plan
def fleet_plan(cfg: SimulateConfig) -> list[LogMeta]:
    """The ``cfg.logs`` logs the fleet recorded: ids, cities, vehicles and start times.

    Log ``i`` is recorded on day ``i % days`` (so days get equal shares) in a city chosen so that every
    (day, city) pair comes up once per ``days * cities`` logs and the first ``len(CITIES)`` logs cover
    every city. A log's id, city and day depend only on its index, so growing the fleet keeps the
    existing logs; its start time (07:00-19:00 UTC) also depends on the seed.
    """
    try:
        first_day = dt.datetime.strptime(cfg.start_date, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise ValueError(f"simulate.start_date {cfg.start_date!r} is not a date (YYYY-MM-DD)") from None
    if cfg.days < 1:
        raise ValueError(f"simulate.days must be at least 1, got {cfg.days}")
    names = list(CITIES)
    cycle = math.lcm(cfg.days, len(names))
    plan = []
    for index in range(cfg.logs):
        day = first_day + dt.timedelta(days=index % cfg.days)
        # (i mod days, i mod cities) alone only reaches the pairs with equal residues mod gcd; shifting
        # the city by one every full cycle reaches the others.
        city = CITIES[names[(index + index // cycle) % len(names)]]
        vehicle_number = (index // len(names)) % 4 + 1  # four cars per city
        seconds = int(_rng(cfg.seed, "start-time", index).integers(7 * 3600, 19 * 3600))
        start_ns = int(day.timestamp()) * 1_000_000_000 + seconds * 1_000_000_000
        plan.append(LogMeta(
            log_id=f"log-{city.name}-{day:%Y%m%d}-{index:04d}",
            vehicle_id=f"av-{city.code}-{vehicle_number:02d}",
            city=city.name,
            start_time_ns=start_ns,
            software_version=f"avstack-4.{2 + vehicle_number % 2}.0",  # half the cars run the newer stack
            source=SOURCE,
        ))
    return plan


# ------------------------------------------------------------------------------------ kinematics
@dataclass(frozen=True)
class SpeedProfile:
    """A smooth speed over time: ``mean + amplitude * sin(omega * t + phase)`` (m/s), so distance and
    acceleration have closed forms and finite differences of positions match the reported speed."""

    mean: float
    amplitude: float
    omega: float
    phase: float

    def speed(self, t: np.ndarray) -> np.ndarray:
        """Speed (m/s) at times ``t`` (s)."""
        return self.mean + self.amplitude * np.sin(self.omega * t + self.phase)

    def acceleration(self, t: np.ndarray) -> np.ndarray:
        """Acceleration (m/s^2) at times ``t`` (s)."""
        return self.amplitude * self.omega * np.cos(self.omega * t + self.phase)

    def distance(self, t: np.ndarray) -> np.ndarray:
        """Distance travelled (m) from time 0 to ``t`` (s)."""
        swing = np.cos(self.omega * t + self.phase) - math.cos(self.phase)
        return self.mean * t - self.amplitude / self.omega * swing


def _speed_profile(rng: np.random.Generator, speeds: tuple[float, float], max_amplitude: float) -> SpeedProfile:
    """A random profile that stays inside ``speeds``; periods of 6-14 s keep accelerations gentle."""
    low, high = speeds
    amplitude = min(rng.uniform(0.0, max_amplitude), (high - low) / 2)
    return SpeedProfile(mean=rng.uniform(low + amplitude, high - amplitude), amplitude=amplitude,
                        omega=2 * math.pi / rng.uniform(6.0, 14.0), phase=rng.uniform(0, 2 * math.pi))


@dataclass(frozen=True)
class Actors:
    """Moving or standing road users: one column per actor, one row per frame (street frame)."""

    class_id: np.ndarray  # (n,) uint8
    size: np.ndarray  # (n, 3) length, width, height
    reflectivity: np.ndarray  # (n,)
    s: np.ndarray  # (F, n) centre along the street
    t: np.ndarray  # (F, n) centre across the street
    yaw: np.ndarray  # (F, n) heading in the street frame

    @staticmethod
    def empty(frames: int) -> "Actors":
        """No actors."""
        return Actors(np.zeros(0, np.uint8), np.zeros((0, 3)), np.zeros(0), *(np.zeros((frames, 0)) for _ in range(3)))

    @staticmethod
    def concat(groups: list["Actors"], frames: int) -> "Actors":
        """All groups' actors, in group order (which fixes their track ids)."""
        groups = [g for g in groups if len(g.class_id)] or [Actors.empty(frames)]
        return Actors(*(np.concatenate([getattr(g, f) for g in groups], axis=1 if f in ("s", "t", "yaw") else 0)
                        for f in ("class_id", "size", "reflectivity", "s", "t", "yaw")))

    def footprint_half_extents(self) -> tuple[np.ndarray, np.ndarray]:
        """(F, n) half extents of each actor's footprint along s and t (axis-aligned, so conservative)."""
        c, s = np.abs(np.cos(self.yaw)), np.abs(np.sin(self.yaw))
        half_length, half_width = self.size[:, 0] / 2, self.size[:, 1] / 2
        return c * half_length + s * half_width, s * half_length + c * half_width


def _sizes(rng: np.random.Generator, n: int, ranges: tuple[tuple[float, float], ...]) -> np.ndarray:
    """``n`` random (length, width, height) rows drawn from ``ranges``."""
    return np.stack([rng.uniform(lo, hi, n) for lo, hi in ranges], axis=1) if n else np.zeros((0, 3))


def _reflectivity(rng: np.random.Generator, class_id: int, n: int) -> np.ndarray:
    """``n`` surface reflectivities for ``class_id``."""
    return rng.uniform(*REFLECTIVITY[class_id], n)


def _slot_positions(rng: np.random.Generator, low: float, high: float, slot: float,
                    share: float) -> tuple[np.ndarray, np.ndarray]:
    """(slot centres, draws for jitter) of the occupied slots of length ``slot`` in ``[low, high]``.

    Placing users in slots (at most one per slot, jittered inside it) guarantees that users sharing a
    lane and a speed never overlap, without any pairwise checking.
    """
    first, last = math.ceil(low / slot), math.floor(high / slot)
    index = np.arange(first, last + 1)
    occupied = rng.random(len(index)) < min(share, 0.95)
    jitter = rng.uniform(-1.0, 1.0, len(index))
    return index[occupied] * slot, jitter[occupied]


def _platoon(rng: np.random.Generator, times: np.ndarray, ego_distance: np.ndarray, reach: float,
             profile: SpeedProfile | None, direction: int, lane_t: float, slot: float, share: float,
             class_id: int, size_ranges: tuple, gap: float, lateral_jitter: float,
             skip_slot_at_zero: bool = False, truck_share: float = 0.0) -> Actors:
    """Users of one lane that share a speed profile (or all stand still when ``profile`` is None).

    They are generated wherever they could come within ``reach`` of the ego during the log.
    """
    moved = direction * profile.distance(times) if profile is not None else np.zeros_like(times)
    relative = ego_distance - moved  # initial s at which a user would sit level with the ego
    centres, jitter = _slot_positions(rng, relative.min() - reach, relative.max() + reach, slot, share)
    if skip_slot_at_zero:  # the ego's own slot in its lane
        keep = np.abs(centres) > slot / 2
        centres, jitter = centres[keep], jitter[keep]
    n = len(centres)
    size = _sizes(rng, n, size_ranges)
    if truck_share > 0:  # a slot is long enough for a truck or bus, so they simply replace cars
        size = np.where((rng.random(n) < truck_share)[:, None], _sizes(rng, n, TRUCK_SIZE), size)
    start = centres + jitter * np.maximum(slot - size[:, 0] - gap, 0.0) / 2
    lateral = lane_t + rng.uniform(-lateral_jitter, lateral_jitter, n)
    yaw = 0.0 if direction > 0 else math.pi
    return Actors(np.full(n, class_id, np.uint8), size, _reflectivity(rng, class_id, n),
                  start[None, :] + moved[:, None], np.broadcast_to(lateral, (len(times), n)).copy(),
                  np.full((len(times), n), yaw))


# ------------------------------------------------------------------------------------ the street
@dataclass(frozen=True)
class Street:
    """Cross-section of the street (|t| of each edge, metres from the centre line)."""

    median_half: float
    lanes_edge: float  # outer edge of the travel lanes
    bike_edge: float
    curb: float  # outer edge of the parking lane = inner edge of the sidewalk
    sidewalk_outer: float
    lane_count: int

    @staticmethod
    def of(city: CityProfile) -> "Street":
        """The cross-section of ``city``'s streets."""
        median_half = city.median_m / 2
        lanes_edge = median_half + city.lanes_per_direction * LANE_WIDTH_M
        bike_edge = lanes_edge + city.bike_lane_m
        curb = bike_edge + city.parking_lane_m
        return Street(median_half, lanes_edge, bike_edge, curb, curb + city.sidewalk_m, city.lanes_per_direction)

    def lane_centre(self, lane: int) -> float:
        """|t| of the centre of lane ``lane`` (0 is next to the median)."""
        return self.median_half + (lane + 0.5) * LANE_WIDTH_M

    def walk_lanes(self) -> list[float]:
        """|t| of the sidewalk walking lanes, clear of the furniture band and the property line."""
        lanes, offset = [], 1.35
        while offset <= self.sidewalk_outer - self.curb - 0.35:
            lanes.append(self.curb + offset)
            offset += WALK_LANE_SPACING_M
        return lanes


@dataclass(frozen=True)
class Statics:
    """The street's fixed geometry in the street frame, with a label and reflectivity per primitive."""

    boxes: np.ndarray  # (n, 7) s, t, z, length, width, height, yaw
    box_label: np.ndarray
    box_reflectivity: np.ndarray
    cylinders: np.ndarray  # (n, 5) s, t, z_bottom, z_top, radius (vertical)
    cylinder_label: np.ndarray
    cylinder_reflectivity: np.ndarray
    spheres: np.ndarray  # (n, 4) s, t, z, radius
    sphere_label: np.ndarray
    sphere_reflectivity: np.ndarray


class _StaticBuilder:
    """Collects static primitives while the street is laid out."""

    def __init__(self) -> None:
        """Start empty."""
        self.boxes: list[tuple] = []
        self.cylinders: list[tuple] = []
        self.spheres: list[tuple] = []

    def box(self, s, t, z, length, width, height, yaw, label, reflectivity) -> None:
        """Add an oriented box."""
        self.boxes.append((s, t, z, length, width, height, yaw, label, reflectivity))

    def cylinder(self, s, t, z0, z1, radius, label, reflectivity) -> None:
        """Add a vertical cylinder."""
        self.cylinders.append((s, t, z0, z1, radius, label, reflectivity))

    def sphere(self, s, t, z, radius, label, reflectivity) -> None:
        """Add a sphere."""
        self.spheres.append((s, t, z, radius, label, reflectivity))

    def build(self) -> Statics:
        """The collected primitives as arrays."""
        def split(rows: list[tuple], width: int):
            table = np.array(rows, np.float64).reshape(-1, width + 2)
            return table[:, :width].copy(), table[:, width].astype(np.uint8), table[:, width + 1].copy()
        return Statics(*split(self.boxes, 7), *split(self.cylinders, 5), *split(self.spheres, 4))


def _tree(out: _StaticBuilder, rng: np.random.Generator, s: float, t: float, trunk: tuple[float, float],
          trunk_height: tuple[float, float], crown: tuple[float, float]) -> None:
    """A trunk (cylinder) with a crown (sphere) on top, both labelled vegetation."""
    radius, height, crown_radius = rng.uniform(*trunk), rng.uniform(*trunk_height), rng.uniform(*crown)
    crown_z = height + 0.7 * crown_radius
    reflectivity = rng.uniform(*REFLECTIVITY[VEGETATION])
    out.cylinder(s, t, 0.0, crown_z, radius, VEGETATION, reflectivity * 0.8)  # bark is darker than leaves
    out.sphere(s, t, crown_z, crown_radius, VEGETATION, reflectivity)


def _build_statics(rng: np.random.Generator, city: CityProfile, street: Street, low: float, high: float,
                   crosswalks: np.ndarray) -> Statics:
    """Buildings, walls, poles with signs, trees and bushes along ``[low, high]`` on both sides."""
    out = _StaticBuilder()
    if city.median_barrier:  # 20 m segments, so every segment's azimuth extent stays small
        for start in np.arange(math.floor(low / 20) * 20, high, 20.0):
            out.box(start + 10, 0.0, 0.45, 20.0, 0.6, 0.9, 0.0, BUILDING, rng.uniform(0.35, 0.5))
    for side in (-1, 1):
        # Furniture band by the curb: at most one pole or tree per slot, none at crosswalks.
        slots = np.arange(math.ceil(low / FURNITURE_SLOT_M), math.floor(high / FURNITURE_SLOT_M) + 1)
        centres = slots * FURNITURE_SLOT_M
        draws = rng.random(len(centres))
        jitter = rng.uniform(-1.5, 1.5, len(centres))
        p_pole = city.poles_per_100m * FURNITURE_SLOT_M / 100
        p_tree = city.street_trees_per_100m * FURNITURE_SLOT_M / 100
        for centre, draw, shift in zip(centres, draws, jitter):
            s = centre + shift
            if len(crosswalks) and np.abs(crosswalks - s).min() < 3.0:
                continue
            t = side * (street.curb + 0.45)
            if draw < p_pole:
                height = rng.uniform(5.0, 9.0)
                out.cylinder(s, t, 0.0, height, rng.uniform(0.08, 0.15), POLE, rng.uniform(*REFLECTIVITY[POLE]))
                if rng.random() < 0.4:  # a traffic sign facing the traffic on this side
                    out.box(s - side * 0.1, t, rng.uniform(2.4, 3.0), 0.04, 0.75, 0.75, 0.0, POLE,
                            rng.uniform(*SIGN_REFLECTIVITY))
            elif draw < p_pole + p_tree:
                _tree(out, rng, s, t, (0.12, 0.2), (2.5, 3.5), (1.2, 2.2))
        # Front yards between the hedge line and the nearest possible building front.
        yard_inner, yard_outer = street.sidewalk_outer + 1.5, street.sidewalk_outer + city.building_setback_m[0] - 1.0
        length = high - low
        if yard_outer > yard_inner:
            for _ in range(rng.poisson(city.yard_trees_per_100m * length / 100)):
                _tree(out, rng, rng.uniform(low, high), side * rng.uniform(yard_inner, yard_outer),
                      (0.15, 0.3), (2.0, 4.0), (1.5, 3.2))
            for _ in range(rng.poisson(city.bushes_per_100m * length / 100)):
                radius = rng.uniform(0.5, 1.2)
                out.sphere(rng.uniform(low, high), side * rng.uniform(yard_inner, yard_outer), 0.3 * radius,
                           radius, VEGETATION, rng.uniform(*REFLECTIVITY[VEGETATION]))
        # Hedges along the property line, in pieces of at most 10 m (small azimuth extents again).
        if city.hedge_share > 0:
            for start in np.arange(math.floor(low / 10) * 10, high, 10.0):
                if rng.random() < city.hedge_share:
                    length, height = rng.uniform(4.0, 10.0), rng.uniform(0.9, 1.8)
                    out.box(start + 5, side * (street.sidewalk_outer + 0.5), height / 2, length, 0.8, height, 0.0,
                            VEGETATION, rng.uniform(*REFLECTIVITY[VEGETATION]))
        # Buildings (or wall segments): frontage, gap, frontage, ... from before ``low`` to past ``high``.
        cursor = low - rng.uniform(0, city.building_frontage_m[1])
        while cursor < high:
            frontage, depth = rng.uniform(*city.building_frontage_m), rng.uniform(*city.building_depth_m)
            height, setback = rng.uniform(*city.building_height_m), rng.uniform(*city.building_setback_m)
            out.box(cursor + frontage / 2, side * (street.sidewalk_outer + setback + depth / 2), height / 2,
                    frontage, depth, height, 0.0, BUILDING, rng.uniform(*REFLECTIVITY[BUILDING]))
            cursor += frontage + rng.uniform(*city.building_gap_m)
    return out.build()


@dataclass(frozen=True)
class Scene:
    """Everything about one log that does not change from frame to frame, plus the per-frame tracks."""

    city: CityProfile
    street: Street
    statics: Statics
    actors: Actors
    ego_s: np.ndarray  # (F,) street frame
    ego_t: np.ndarray
    ego_yaw: np.ndarray
    ego_speed: np.ndarray
    ego_acceleration: np.ndarray
    ego_lane_t: float
    origin_xy: tuple[float, float]  # world position of the street frame's origin
    heading: float  # world heading of +s


def _build_scene(meta: LogMeta, cfg: SimulateConfig) -> Scene:
    """Lay out the street, its traffic and the ego's drive for ``cfg.frames`` frames of ``meta``'s log."""
    if meta.city not in CITIES:
        raise ValueError(f"log {meta.log_id}: unknown city {meta.city!r}; known: {', '.join(CITIES)}")
    city, frames = CITIES[meta.city], cfg.frames
    street = Street.of(city)
    rng = _rng(cfg.seed, meta.log_id, "scene")
    times = np.arange(frames) * FRAME_PERIOD_S
    reach = cfg.max_range_m + SCENE_MARGIN_M

    # The ego: a lane of its direction, a smooth speed, and a gentle weave inside the lane.
    ego_lane = int(rng.integers(city.lanes_per_direction))
    ego_lane_t = -street.lane_centre(ego_lane)
    ego_profile = _speed_profile(rng, city.ego_speed_mps, 1.5)
    weave_amplitude, weave_k = rng.uniform(0.05, 0.3), 2 * math.pi / rng.uniform(40.0, 90.0)
    weave_phase = rng.uniform(0, 2 * math.pi)
    ego_s = ego_profile.distance(times)
    ego_t = ego_lane_t + weave_amplitude * np.sin(weave_k * ego_s + weave_phase)
    slope = weave_amplitude * weave_k * np.cos(weave_k * ego_s + weave_phase)  # dt/ds
    curvature = -weave_amplitude * weave_k ** 2 * np.sin(weave_k * ego_s + weave_phase)  # d2t/ds2
    along, along_acc = ego_profile.speed(times), ego_profile.acceleration(times)
    stretch = np.sqrt(1 + slope ** 2)  # path length per metre of s
    ego_speed = along * stretch
    ego_acceleration = along_acc * stretch + along ** 2 * slope * curvature / stretch
    ego_yaw = np.arctan(slope)

    # Where the street sits in the city.
    origin_xy = (rng.uniform(-LOG_SPREAD_M, LOG_SPREAD_M), rng.uniform(-LOG_SPREAD_M, LOG_SPREAD_M))
    heading = math.radians(city.grid_heading_deg) + int(rng.integers(4)) * math.pi / 2

    low, high = ego_s.min() - reach, ego_s.max() + reach
    crosswalks = np.zeros(0)
    if city.crosswalk_spacing_m > 0:
        spacing, offset = city.crosswalk_spacing_m, rng.uniform(0, city.crosswalk_spacing_m)
        crosswalks = np.arange(math.floor((low - offset) / spacing), math.ceil((high - offset) / spacing) + 1) * spacing
        crosswalks = crosswalks + offset
    statics = _build_statics(rng, city, street, low, high, crosswalks)

    movers: list[Actors] = []  # everything that moves, which crossing pedestrians must not walk into
    standing: list[Actors] = []
    vehicle_share = city.vehicles_per_100m * VEHICLE_SLOT_M / 100
    for side, direction in ((-1, 1), (1, -1)):  # right-hand traffic: +s lanes at t < 0
        for lane in range(city.lanes_per_direction):
            is_ego_lane = direction > 0 and lane == ego_lane
            # The ego's lane moves with the ego (same profile): traffic ahead and behind keeps its gap.
            profile = ego_profile if is_ego_lane else _speed_profile(rng, city.vehicle_speed_mps, 1.0)
            movers.append(_platoon(rng, times, ego_s, reach, profile, direction, side * street.lane_centre(lane),
                                   VEHICLE_SLOT_M, vehicle_share, VEHICLE, CAR_SIZE, VEHICLE_GAP_M, 0.1,
                                   skip_slot_at_zero=is_ego_lane, truck_share=city.truck_share))
        if city.bike_lane_m > 0 and city.cyclists_per_100m > 0:
            movers.append(_platoon(rng, times, ego_s, reach, _speed_profile(rng, (3.0, 6.0), 0.5), direction,
                                   side * (street.lanes_edge + city.bike_lane_m / 2), CYCLIST_SLOT_M,
                                   city.cyclists_per_100m * CYCLIST_SLOT_M / 100, CYCLIST, CYCLIST_SIZE, 1.0, 0.15))
        if city.parking_lane_m > 0 and city.parked_per_100m > 0:
            parked = _platoon(rng, times, ego_s, reach, None, direction, side * (street.curb - city.parking_lane_m / 2),
                              PARKED_SLOT_M, city.parked_per_100m * PARKED_SLOT_M / 100, VEHICLE, CAR_SIZE, 1.0, 0.05)
            clear = np.ones(parked.size.shape[0], bool)  # keep crosswalks free of parked cars
            for crossing in crosswalks:
                clear &= np.abs(parked.s[0] - crossing) > 6.0
            parked = _select(parked, clear)
            parked.yaw[:] += rng.uniform(-0.03, 0.03, parked.size.shape[0])[None, :]
            standing.append(parked)
        walk_lanes = street.walk_lanes()
        standing_lane = walk_lanes.pop() if len(walk_lanes) >= 3 and city.standing_per_100m > 0 else None
        for k, lane_t in enumerate(walk_lanes):  # alternate walking directions lane by lane
            walk_direction = 1 if (k + (side > 0)) % 2 == 0 else -1
            profile = SpeedProfile(rng.uniform(1.0, 1.5), 0.0, 1.0, 0.0)
            movers.append(_platoon(rng, times, ego_s, reach, profile, walk_direction, side * lane_t, WALKER_SLOT_M,
                                   city.walkers_per_100m / len(walk_lanes) * WALKER_SLOT_M / 100, PEDESTRIAN,
                                   PEDESTRIAN_SIZE, 0.6, 0.05))
        if standing_lane is not None:
            people = _platoon(rng, times, ego_s, reach, None, 1, side * standing_lane, STANDING_SLOT_M,
                              city.standing_per_100m * STANDING_SLOT_M / 100, PEDESTRIAN, PEDESTRIAN_SIZE, 0.5, 0.05)
            people.yaw[:] = rng.uniform(-math.pi, math.pi, people.size.shape[0])[None, :]
            standing.append(people)
    crossers = _crossing_pedestrians(rng, times, street, crosswalks, city, movers, ego_s, ego_t, ego_yaw)
    actors = Actors.concat(movers + standing + [crossers], frames)
    return Scene(city, street, statics, actors, ego_s, ego_t, ego_yaw, ego_speed, ego_acceleration,
                 ego_lane_t, origin_xy, heading)


def _select(actors: Actors, keep: np.ndarray) -> Actors:
    """The actors where ``keep`` is true."""
    return Actors(actors.class_id[keep], actors.size[keep], actors.reflectivity[keep], actors.s[:, keep].copy(),
                  actors.t[:, keep].copy(), actors.yaw[:, keep].copy())


def _crossing_pedestrians(rng: np.random.Generator, times: np.ndarray, street: Street, crosswalks: np.ndarray,
                          city: CityProfile, movers: list[Actors], ego_s: np.ndarray, ego_t: np.ndarray,
                          ego_yaw: np.ndarray) -> Actors:
    """People walking across the street at the crosswalks, kept only if they never touch traffic.

    A crosser walks from curb to curb and waits at the far curb; a candidate whose footprint ever comes
    within 0.4 m of a vehicle, cyclist, the ego or an earlier crosser during the log is dropped.
    """
    frames = len(times)
    traffic = Actors.concat(movers, frames)
    half_s, half_t = traffic.footprint_half_extents()
    ego_half_s = np.abs(np.cos(ego_yaw)) * EGO_SIZE_M[0] / 2 + np.abs(np.sin(ego_yaw)) * EGO_SIZE_M[1] / 2
    ego_half_t = np.abs(np.sin(ego_yaw)) * EGO_SIZE_M[0] / 2 + np.abs(np.cos(ego_yaw)) * EGO_SIZE_M[1] / 2
    others_s = np.concatenate([traffic.s, ego_s[:, None]], axis=1)
    others_t = np.concatenate([traffic.t, ego_t[:, None]], axis=1)
    others_hs = np.concatenate([half_s, ego_half_s[:, None]], axis=1)
    others_ht = np.concatenate([half_t, ego_half_t[:, None]], axis=1)
    span = street.curb + 0.6  # they wait in the furniture band, clear of the walking lanes
    accepted: list[tuple] = []
    for crossing in crosswalks:
        for _ in range(rng.poisson(city.crossers_per_crosswalk)):
            size = _sizes(rng, 1, PEDESTRIAN_SIZE)[0]
            s = crossing + rng.uniform(-1.2, 1.2)
            direction = 1 if rng.random() < 0.5 else -1
            path_t = np.clip(rng.uniform(-span, span) + direction * rng.uniform(1.0, 1.5) * times, -span, span)
            reflectivity = rng.uniform(*REFLECTIVITY[PEDESTRIAN])
            near = np.abs(others_s - s).min(axis=0) < 30.0  # only nearby traffic can ever touch it
            half = max(size[0], size[1]) / 2
            touches = ((np.abs(others_s[:, near] - s) < others_hs[:, near] + half + 0.4)
                       & (np.abs(others_t[:, near] - path_t[:, None]) < others_ht[:, near] + half + 0.4)).any()
            if touches:
                continue
            accepted.append((size, reflectivity, s, path_t, direction))
            others_s = np.concatenate([others_s, np.full((frames, 1), s)], axis=1)
            others_t = np.concatenate([others_t, path_t[:, None]], axis=1)
            others_hs = np.concatenate([others_hs, np.full((frames, 1), half)], axis=1)
            others_ht = np.concatenate([others_ht, np.full((frames, 1), half)], axis=1)
    if not accepted:
        return Actors.empty(frames)
    sizes, reflectivities, along, paths, directions = zip(*accepted)
    return Actors(np.full(len(accepted), PEDESTRIAN, np.uint8), np.stack(sizes), np.array(reflectivities),
                  np.tile(np.array(along), (frames, 1)), np.stack(paths, axis=1),
                  np.tile(np.array(directions) * math.pi / 2, (frames, 1)))


# ------------------------------------------------------------------------------------ the sensor
@dataclass(frozen=True)
class Rays:
    """Unit ray directions of one sweep in the sensor frame, ``(beams, azimuth_steps)`` each."""

    elevation: np.ndarray  # (beams,) radians, ascending
    dx: np.ndarray
    dy: np.ndarray
    dz: np.ndarray
    ground_t: np.ndarray  # (beams,) distance to the road along each beam (inf for beams at or above level)


@lru_cache(maxsize=8)
def _rays(beams: int, azimuth_steps: int) -> Rays:
    """The sweep's ray directions (cached: they only depend on the sensor layout)."""
    elevation = np.radians(np.linspace(*BEAM_ELEVATION_DEG, beams))
    azimuth = np.arange(azimuth_steps) * (2 * math.pi / azimuth_steps)
    cos_e = np.cos(elevation)[:, None]
    dx = (cos_e * np.cos(azimuth)[None, :]).astype(np.float32)
    dy = (cos_e * np.sin(azimuth)[None, :]).astype(np.float32)
    dz = np.broadcast_to(np.sin(elevation)[:, None], dx.shape).astype(np.float32)
    with np.errstate(divide="ignore"):
        ground_t = np.where(elevation < 0, SENSOR_HEIGHT_M / -np.sin(elevation), np.inf).astype(np.float32)
    for array in (elevation, dx, dy, dz, ground_t):
        array.setflags(write=False)
    return Rays(elevation, dx, dy, dz, ground_t)


def _column_slices(low: float, high: float, steps: int) -> list[slice]:
    """Azimuth columns whose angle lies in ``[low, high]`` radians (one column of slack each side),
    as one or two slices (two when the interval wraps past 0)."""
    step = 2 * math.pi / steps
    first, last = math.floor(low / step), math.ceil(high / step)
    count = last - first + 1
    if count >= steps:
        return [slice(0, steps)]
    start = first % steps
    if start + count <= steps:
        return [slice(start, start + count)]
    return [slice(start, steps), slice(0, start + count - steps)]


def _beam_slice(elevation: np.ndarray, z_low: float, z_high: float, near: float, far: float) -> slice:
    """Beams that can reach an object spanning heights ``[z_low, z_high]`` (sensor frame) at horizontal
    distances ``[near, far]``."""
    top = math.atan2(z_high, near if z_high >= 0 else far)
    bottom = math.atan2(z_low, near if z_low < 0 else far)
    return slice(int(np.searchsorted(elevation, bottom - 1e-4, "left")),
                 int(np.searchsorted(elevation, top + 1e-4, "right")))


def _box_hits(dx, dy, dz, box) -> np.ndarray:
    """Distance along each ray to an oriented box (slab test in the box's own frame), inf on a miss."""
    cx, cy, cz, length, width, height, yaw = box
    c, s = math.cos(yaw), math.sin(yaw)
    # The sensor (the rays' origin) and the directions expressed in the box's frame.
    ox, oy, oz = -(c * cx + s * cy), s * cx - c * cy, -cz
    local_dx = c * dx + s * dy
    local_dy = c * dy - s * dx
    with np.errstate(divide="ignore", invalid="ignore"):
        near, far = _slab(ox, local_dx, length / 2)
        near_y, far_y = _slab(oy, local_dy, width / 2)
        near_z, far_z = _slab(oz, dz, height / 2)
        np.maximum(near, near_y, out=near)
        np.maximum(near, near_z, out=near)
        np.minimum(far, far_y, out=far)
        np.minimum(far, far_z, out=far)
    return np.where((near <= far) & (near > MIN_HIT_M), near, np.float32(np.inf))


def _slab(origin: float, direction: np.ndarray, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances of rays through the slab ``|x| <= half`` along one axis."""
    inverse = 1.0 / direction
    t1, t2 = (-half - origin) * inverse, (half - origin) * inverse
    return np.minimum(t1, t2), np.maximum(t1, t2)


def _cylinder_hits(dx, dy, dz, cylinder) -> np.ndarray:
    """Distance along each ray to a vertical cylinder (side, plus the top when it is below the sensor)."""
    cx, cy, z_bottom, z_top, radius = cylinder
    horizontal = dx * dx + dy * dy  # cos^2(elevation): never 0 for a real sensor's beams
    closest = (dx * cx + dy * cy) / horizontal  # ray parameter where the ray passes closest to the axis
    # Offset of that closest point from the axis, computed directly so float32 keeps thin poles exact
    # (|c|^2 - (d.c)^2 would cancel catastrophically at 60 m).
    qx, qy = cx - closest * dx, cy - closest * dy
    room = radius * radius - (qx * qx + qy * qy)
    t = closest - np.sqrt(np.maximum(room, 0) / horizontal)
    z = t * dz
    hit = (room >= 0) & (t > MIN_HIT_M) & (z >= z_bottom) & (z <= z_top)
    t = np.where(hit, t, np.float32(np.inf))
    if z_top < 0:  # a low cylinder is also seen from above
        with np.errstate(divide="ignore", invalid="ignore"):
            t_cap = z_top / dz
        px, py = t_cap * dx - cx, t_cap * dy - cy
        on_cap = (dz < 0) & (px * px + py * py <= radius * radius)
        t = np.minimum(t, np.where(on_cap, t_cap, np.float32(np.inf)))
    return t


def _sphere_hits(dx, dy, dz, sphere) -> np.ndarray:
    """Distance along each ray to a sphere, inf on a miss."""
    cx, cy, cz, radius = sphere
    closest = dx * cx + dy * cy + dz * cz
    qx, qy, qz = cx - closest * dx, cy - closest * dy, cz - closest * dz  # stable in float32, see cylinders
    room = radius * radius - (qx * qx + qy * qy + qz * qz)
    t = closest - np.sqrt(np.maximum(room, 0))
    return np.where((room >= 0) & (t > MIN_HIT_M), t, np.float32(np.inf))


def _box_extents(boxes: np.ndarray):
    """Per box: centre bearing, bearing span (low, high), horizontal distance (near, far) and a flag for
    boxes whose footprint contains the sensor. ``boxes`` is (n, 7) in the sensor frame."""
    cx, cy = boxes[:, 0], boxes[:, 1]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    half_l, half_w = boxes[:, 3] / 2, boxes[:, 4] / 2
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float64)
    corner_x = cx[:, None] + c[:, None] * signs[:, 0] * half_l[:, None] - s[:, None] * signs[:, 1] * half_w[:, None]
    corner_y = cy[:, None] + s[:, None] * signs[:, 0] * half_l[:, None] + c[:, None] * signs[:, 1] * half_w[:, None]
    bearing = np.arctan2(cy, cx)
    relative = np.angle(np.exp(1j * (np.arctan2(corner_y, corner_x) - bearing[:, None])))
    # Nearest point of the footprint: the sensor position clamped into the box, in the box's frame.
    local_x, local_y = -(c * cx + s * cy), s * cx - c * cy
    gap_x, gap_y = np.maximum(np.abs(local_x) - half_l, 0), np.maximum(np.abs(local_y) - half_w, 0)
    near = np.hypot(gap_x, gap_y)
    far = np.hypot(corner_x, corner_y).max(axis=1)
    return bearing + relative.min(axis=1), bearing + relative.max(axis=1), near, far, near <= 0


def cast_sweep(rays: Rays, max_range: float, boxes: np.ndarray, cylinders: np.ndarray,
               spheres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast one sweep against the road plane and the given primitives (all in the sensor frame).

    Returns ``(depth, owner)``, both ``(beams, azimuth_steps)``: the distance to the nearest hit (inf for
    none) and what was hit: -1 nothing, 0 the road, ``1..`` boxes, then cylinders, then spheres, in the
    order given. Primitives entirely beyond ``max_range`` are skipped.
    """
    steps = rays.dx.shape[1]
    depth = np.repeat(rays.ground_t[:, None], steps, axis=1)
    owner = np.where(np.isfinite(depth), 0, -1).astype(np.int32)

    def update(hit_fn, primitive, owner_id: int, beams: slice, columns: list[slice]) -> None:
        """Cast one primitive against its block of rays and keep the nearer hits."""
        if beams.start >= beams.stop:
            return
        for cols in columns:
            t = hit_fn(rays.dx[beams, cols], rays.dy[beams, cols], rays.dz[beams, cols], primitive)
            block = depth[beams, cols]  # a view: basic slicing only
            closer = t < block
            np.copyto(block, t, where=closer)
            np.copyto(owner[beams, cols], owner_id, where=closer)

    next_id = 1
    if len(boxes):
        low, high, near, far, inside = _box_extents(boxes)
        z_low, z_high = boxes[:, 2] - boxes[:, 5] / 2, boxes[:, 2] + boxes[:, 5] / 2
        for i in range(len(boxes)):
            if near[i] <= max_range:
                columns = [slice(0, steps)] if inside[i] else _column_slices(low[i], high[i], steps)
                beams = _beam_slice(rays.elevation, z_low[i], z_high[i], near[i], far[i])
                update(_box_hits, tuple(map(float, boxes[i])), next_id + i, beams, columns)
        next_id += len(boxes)
    for table, hit_fn, z_low, z_high in (
        (cylinders, _cylinder_hits, cylinders[:, 2], cylinders[:, 3]),
        (spheres, _sphere_hits, spheres[:, 2] - spheres[:, 3], spheres[:, 2] + spheres[:, 3]),
    ):
        if not len(table):
            continue
        radius = table[:, -1]
        distance = np.hypot(table[:, 0], table[:, 1])
        bearing = np.arctan2(table[:, 1], table[:, 0])
        half_angle = np.arcsin(np.clip(radius / np.maximum(distance, 1e-9), 0, 1))
        for i in range(len(table)):
            near, far = max(distance[i] - radius[i], 0.0), distance[i] + radius[i]
            if near > max_range:
                continue
            columns = ([slice(0, steps)] if distance[i] <= radius[i]
                       else _column_slices(bearing[i] - half_angle[i], bearing[i] + half_angle[i], steps))
            beams = _beam_slice(rays.elevation, z_low[i], z_high[i], near, far)
            update(hit_fn, tuple(map(float, table[i])), next_id + i, beams, columns)
        next_id += len(table)
    return depth, owner


# ------------------------------------------------------------------------------------ frames
def _to_sensor(s, t, ego_s: float, ego_t: float, ego_yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Street-frame positions into the sensor frame's x (forward) and y (left)."""
    c, sn = math.cos(ego_yaw), math.sin(ego_yaw)
    ds, dt_ = np.asarray(s) - ego_s, np.asarray(t) - ego_t
    return c * ds + sn * dt_, -sn * ds + c * dt_


def _wrap(angle):
    """Angles wrapped into [-pi, pi)."""
    return (np.asarray(angle) + math.pi) % (2 * math.pi) - math.pi


def _ground_reflectivity(scene: Scene, hit_s: np.ndarray, hit_t: np.ndarray) -> np.ndarray:
    """Road surface reflectivity where the rays hit: asphalt, painted lines, sidewalk, verge."""
    street, across = scene.street, np.abs(hit_t)
    value = np.where(across <= street.curb, ASPHALT,
                     np.where(across <= street.sidewalk_outer, CONCRETE, TERRAIN)).astype(np.float32)
    lines = [street.median_half, street.lanes_edge]  # centre line and edge lines: solid
    dashed = [street.median_half + k * LANE_WIDTH_M for k in range(1, street.lane_count)]
    paint = np.zeros(len(across), bool)
    for line in lines:
        paint |= np.abs(across - line) < 0.08
    for line in dashed:  # 3 m dashes every 9 m
        paint |= (np.abs(across - line) < 0.08) & (np.mod(hit_s, 9.0) < 3.0)
    return np.where(paint, np.float32(PAINT), value)


def _render(scene: Scene, index: int, meta: LogMeta, cfg: SimulateConfig) -> Frame:
    """Frame ``index``: cast the sweep, add noise and dropouts, and fill boxes, ego, GPS and route."""
    rays = _rays(cfg.beams, cfg.azimuth_steps)
    ego_s, ego_t, ego_yaw = (float(a[index]) for a in (scene.ego_s, scene.ego_t, scene.ego_yaw))
    reach = cfg.max_range_m + SCENE_MARGIN_M

    # Everything within reach, in the sensor frame (float64 here; the casting blocks are float32).
    st, actors = scene.statics, scene.actors
    box_x, box_y = _to_sensor(st.boxes[:, 0], st.boxes[:, 1], ego_s, ego_t, ego_yaw)
    actor_x, actor_y = _to_sensor(actors.s[index], actors.t[index], ego_s, ego_t, ego_yaw)
    static_near = np.hypot(box_x, box_y) - np.hypot(st.boxes[:, 3], st.boxes[:, 4]) / 2 <= reach
    actor_near = np.nonzero(np.hypot(actor_x, actor_y) <= reach)[0]
    boxes = np.concatenate([
        np.column_stack([box_x, box_y, st.boxes[:, 2] - SENSOR_HEIGHT_M, st.boxes[:, 3:6],
                         st.boxes[:, 6] - ego_yaw])[static_near],
        np.column_stack([actor_x, actor_y, actors.size[:, 2] / 2 - SENSOR_HEIGHT_M, actors.size,
                         actors.yaw[index] - ego_yaw])[actor_near],
    ])
    cyl_x, cyl_y = _to_sensor(st.cylinders[:, 0], st.cylinders[:, 1], ego_s, ego_t, ego_yaw)
    cyl_near = np.hypot(cyl_x, cyl_y) <= reach
    cylinders = np.column_stack([cyl_x, cyl_y, st.cylinders[:, 2:4] - SENSOR_HEIGHT_M, st.cylinders[:, 4]])[cyl_near]
    sph_x, sph_y = _to_sensor(st.spheres[:, 0], st.spheres[:, 1], ego_s, ego_t, ego_yaw)
    sph_near = np.hypot(sph_x, sph_y) <= reach
    spheres = np.column_stack([sph_x, sph_y, st.spheres[:, 2] - SENSOR_HEIGHT_M, st.spheres[:, 3]])[sph_near]

    # Per owner id (0 = road, then boxes, cylinders, spheres as passed to the caster): label, reflectivity.
    n_static_boxes = int(static_near.sum())
    label = np.concatenate([[GROUND], st.box_label[static_near], actors.class_id[actor_near],
                            st.cylinder_label[cyl_near], st.sphere_label[sph_near]]).astype(np.uint8)
    reflectivity = np.concatenate([[0.0], st.box_reflectivity[static_near], actors.reflectivity[actor_near],
                                   st.cylinder_reflectivity[cyl_near], st.sphere_reflectivity[sph_near]])
    reflectivity = reflectivity.astype(np.float32)

    depth, owner = cast_sweep(rays, cfg.max_range_m, boxes, cylinders, spheres)

    # Sensor effects, drawn for every ray so the streams do not depend on what was hit.
    noise_rng = _rng(cfg.seed, meta.log_id, "frame", index)
    shape = depth.shape
    measured = depth + noise_rng.standard_normal(shape, np.float32) * np.float32(cfg.range_noise_m)
    dropped = noise_rng.random(shape, np.float32) < np.float32(cfg.dropout)
    intensity_noise = noise_rng.standard_normal(shape, np.float32) * np.float32(0.02)
    keep = (owner >= 0) & (depth <= cfg.max_range_m) & (measured <= cfg.max_range_m) & (measured > MIN_HIT_M) & ~dropped

    r = measured[keep]
    hit_owner = owner[keep]
    dx, dy, dz = rays.dx[keep], rays.dy[keep], rays.dz[keep]
    base = reflectivity[hit_owner]
    on_road = hit_owner == 0
    if on_road.any():  # the road's reflectivity depends on where the ray lands on the street
        true_r = depth[keep][on_road]
        c, s = math.cos(ego_yaw), math.sin(ego_yaw)
        x, y = dx[on_road] * true_r, dy[on_road] * true_r
        base[on_road] = _ground_reflectivity(scene, ego_s + c * x - s * y, ego_t + s * x + c * y)
    intensity = np.clip(base * (1 - 0.5 * r / np.float32(cfg.max_range_m)) + intensity_noise[keep], 0, 1)
    points = np.column_stack([dx * r, dy * r, dz * r, intensity]).astype(np.float32)
    labels = label[hit_owner]

    # Boxes of the actors that were seen (at least one point), with stable track ids.
    hits_per_owner = np.bincount(hit_owner, minlength=len(label))
    rows = np.nonzero(hits_per_owner[1 + n_static_boxes: 1 + n_static_boxes + len(actor_near)])[0]
    seen = actor_near[rows]  # ascending, as ``actor_near`` is
    actor_boxes = boxes[n_static_boxes:][rows]
    box_table = np.zeros((len(seen), len(BOX_COLUMNS)), np.float32)
    if len(seen):
        box_table[:, :7] = actor_boxes
        box_table[:, 6] = _wrap(actor_boxes[:, 6])
        box_table[:, 7] = actors.class_id[seen]
        box_table[:, 8] = seen + 1  # track ids start at 1

    return Frame(log_id=meta.log_id, frame_index=index, timestamp_ns=meta.start_time_ns + index * FRAME_PERIOD_NS,
                 points=points, labels=labels, boxes=box_table, ego=_ego_state(scene, index),
                 gps=_gps(scene, index), route=_route(scene, index))


def _world_xy(scene: Scene, s: float, t: float) -> tuple[float, float]:
    """World (east, north) of a street-frame position."""
    c, sn = math.cos(scene.heading), math.sin(scene.heading)
    return scene.origin_xy[0] + c * s - sn * t, scene.origin_xy[1] + sn * s + c * t


def _ego_state(scene: Scene, index: int) -> np.ndarray:
    """x, y, z, heading, speed, acceleration of the ego in the world frame."""
    x, y = _world_xy(scene, float(scene.ego_s[index]), float(scene.ego_t[index]))
    heading = float(_wrap(scene.heading + scene.ego_yaw[index]))
    return np.array([x, y, 0.0, heading, scene.ego_speed[index], scene.ego_acceleration[index]], np.float64)


def _gps(scene: Scene, index: int) -> np.ndarray:
    """Latitude, longitude, altitude of the ego: the city origin plus its world offset (tangent plane)."""
    x, y = _world_xy(scene, float(scene.ego_s[index]), float(scene.ego_t[index]))
    city = scene.city
    latitude = city.origin_lat + math.degrees(y / EARTH_RADIUS_M)
    longitude = city.origin_lon + math.degrees(x / (EARTH_RADIUS_M * math.cos(math.radians(city.origin_lat))))
    return np.array([latitude, longitude, city.origin_alt], np.float64)


def _route(scene: Scene, index: int) -> np.ndarray:
    """Offset from the lane centre (m, + is left), the lane's world heading and the speed limit."""
    return np.array([scene.ego_t[index] - scene.ego_lane_t, float(_wrap(scene.heading)), scene.city.speed_limit_mps],
                    np.float64)


def simulate_log(meta: LogMeta, cfg: SimulateConfig) -> Iterator[Frame]:
    """The ``cfg.frames`` frames (10 Hz) of ``meta``'s log; the same (seed, log id) gives the same bytes."""
    if cfg.frames < 1 or cfg.beams < 1 or cfg.azimuth_steps < 1:
        raise ValueError("simulate.frames, beams and azimuth_steps must be at least 1")
    scene = _build_scene(meta, cfg)
    for index in range(cfg.frames):
        yield _render(scene, index, meta, cfg)

