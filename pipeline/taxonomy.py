"""The pipeline's class taxonomy. Every source maps its own labels into these ids through a documented
label map (see docs/label-maps.md); what cannot be labelled maps to ``ignore`` (excluded from loss and metrics)."""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "ignore",      # 0: unlabelled / not mappable
    "ground",      # 1: road, sidewalk, parking, terrain
    "building",    # 2: buildings, walls, fences
    "vegetation",  # 3: trees, bushes, trunks
    "pole",        # 4: poles, traffic signs, traffic lights
    "vehicle",     # 5: cars, trucks, buses, trailers, motorcycles (parked or moving)
    "pedestrian",  # 6: people on foot
    "cyclist",     # 7: a person riding a bicycle, with the bicycle
)
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)
IGNORE = CLASS_ID["ignore"]
OBJECT_CLASSES = ("vehicle", "pedestrian", "cyclist")  # the classes that have 3D boxes and track ids
OBJECT_CLASS_IDS = tuple(CLASS_ID[c] for c in OBJECT_CLASSES)
