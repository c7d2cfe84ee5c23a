"""``bev_segnet``: a per-point LiDAR semantic segmenter through a bird's-eye-view (BEV) grid.

After Lyft Level 5's LiDAR segmentation network, laid out like an OpenPCDet detector: a short list of
stages, each a small module built from the config, run in order::

    points [B, N, 4] (x, y, z, intensity) + valid [B, N]
      1. BEVGrid            which BEV cell each point falls in; its offset from the cell's centre
      2. PointEncoder       per-point MLP on (x, y, z, intensity, cell offset, range)     -> [B*N, C]
      3. BEVScatter         pool point features per cell (max or mean) into an image      -> [B, C+1, H, W]
      4. BEVBackbone        strided 2D conv levels + FPN-style top-down upsampling        -> [B, C', H/2, W/2]
      5. BEVGather          read the BEV features back at every point's cell
      6. PointHead          concat(point, cell, BEV context, in-grid flag) -> MLP          -> [B, N, K]

The input contract shared by the trainer, evaluator and serving package::

    forward(points: Tensor[B, N, 4] float32, valid: Tensor[B, N] bool) -> Tensor[B, N, NUM_CLASSES] float32

* B and N are dynamic. There is no data-dependent Python control flow, so the model passes
  ``torch.jit.script`` and ``torch.export.export`` with dynamic B and N.
* Padded points (``valid`` False) are zeroed on entry and routed to a "trash" cell that is dropped after
  pooling, so they never influence another point's output. Their own logits are finite but meaningless.
* Points outside the grid range still get a prediction: they skip the scatter (so they do not pollute
  the edge cells, which clamping would do), gather an all-zero BEV/cell feature instead, and the head sees
  an ``in_grid`` flag of 0, so it classifies them from their own point features alone.
* Nothing mixes information across points except the scatter/gather through the grid, so permuting the
  points permutes the logits (exactly for max pooling, up to float summation order for mean pooling).
* The backbone's BatchNorm uses batch statistics while training (frames in a batch share them, padding
  does not enter them); in eval mode every frame's output is independent of what it is batched with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.taxonomy import NUM_CLASSES
from training.models.registry import model_info, register_model

# Raw per-point inputs of the point MLP: x, y, z, intensity, offset-in-cell x/y, planar range.
POINT_INPUT_FEATURES = 7


@dataclass
class BEVSegNetConfig:
    """Everything that shapes ``BEVSegNet``. Defaults: a 102.4 m square at 0.4 m -> a 256 x 256 grid."""

    num_classes: int = NUM_CLASSES
    x_range_m: tuple[float, float] = (-51.2, 51.2)  # BEV grid extent along x (forward), metres
    y_range_m: tuple[float, float] = (-51.2, 51.2)  # and along y (left)
    cell_size_m: float = 0.4  # side of one square BEV cell
    height_scale_m: float = 3.0  # z is divided by this so the point MLP sees inputs of order 1
    point_channels: tuple[int, ...] = (32, 32)  # widths of the per-point MLP layers
    pooling: Literal["max", "mean"] = "max"  # how point features are reduced per BEV cell
    backbone_channels: tuple[int, ...] = (32, 64, 96)  # one entry per level; level i is at stride 2**(i+1)
    blocks_per_level: int = 1  # extra 3x3 conv blocks after each level's strided conv
    neck_channels: int = 48  # width of the top-down (FPN-style) path and of the gathered BEV feature
    head_channels: int = 32  # hidden width of the per-point classifier

    def grid_size(self) -> tuple[int, int]:
        """(width along x, height along y) of the BEV grid in cells."""
        return _cells(self.x_range_m, self.cell_size_m), _cells(self.y_range_m, self.cell_size_m)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the config cannot build a model."""
        if self.num_classes < 2:
            raise ValueError(f"bev_segnet.num_classes must be >= 2, got {self.num_classes}")
        if self.cell_size_m <= 0:
            raise ValueError(f"bev_segnet.cell_size_m must be > 0, got {self.cell_size_m}")
        if self.height_scale_m <= 0:
            raise ValueError(f"bev_segnet.height_scale_m must be > 0, got {self.height_scale_m}")
        for field_name in ("x_range_m", "y_range_m"):
            low, high = getattr(self, field_name)
            if not low < high:
                raise ValueError(
                    f"bev_segnet.{field_name} must be (low, high) with low < high, got {(low, high)}"
                )
        width, height = self.grid_size()
        if width * height > 4096 * 4096:
            raise ValueError(f"bev_segnet grid of {width} x {height} cells is too large; raise cell_size_m")
        for field_name in ("point_channels", "backbone_channels"):
            widths = getattr(self, field_name)
            if not widths or any(w < 1 for w in widths):
                raise ValueError(f"bev_segnet.{field_name} needs at least one positive width, got {widths}")
        for field_name in ("blocks_per_level",):
            if getattr(self, field_name) < 0:
                raise ValueError(f"bev_segnet.{field_name} must be >= 0")
        for field_name in ("neck_channels", "head_channels"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"bev_segnet.{field_name} must be >= 1")
        if self.pooling not in ("max", "mean"):
            raise ValueError(f"bev_segnet.pooling must be 'max' or 'mean', got {self.pooling!r}")


def _cells(value_range: tuple[float, float], cell_size: float) -> int:
    """Cells needed to cover ``value_range``; the small epsilon keeps 102.4 / 0.4 at 256, not 257."""
    return max(1, math.ceil((value_range[1] - value_range[0]) / cell_size - 1e-6))


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------


class BEVGrid(nn.Module):
    """Stage 1: assigns points to BEV cells. No parameters; pure index arithmetic.

    Returns, for flattened points [B*N]:
      * ``cell``: the flat cell id ``b*H*W + iy*W + ix``, or ``B*H*W`` (a trash cell) for padded points and
        points outside the grid, so the scatter can drop them without data-dependent indexing;
      * ``in_grid``: whether the point is valid and inside the grid;
      * ``offset``: the point's position inside its cell in [-1, 1] (x, y), computed from the unclamped
        cell so it is meaningful for out-of-grid points too.
    """

    def __init__(self, config: BEVSegNetConfig) -> None:
        super().__init__()
        self.x_min = float(config.x_range_m[0])
        self.y_min = float(config.y_range_m[0])
        self.cell_size = float(config.cell_size_m)
        self.width, self.height = config.grid_size()

    def forward(
        self, xy: Tensor, valid: Tensor, batch_index: Tensor, batch_size: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``xy`` [M, 2] metres, ``valid`` [M] bool, ``batch_index`` [M] long -> (cell, in_grid, offset)."""
        # Continuous cell coordinates; clamped so that inf or huge coordinates cannot overflow the cast.
        grid_x = ((xy[:, 0] - self.x_min) / self.cell_size).clamp(-1.0, float(self.width) + 1.0)
        grid_y = ((xy[:, 1] - self.y_min) / self.cell_size).clamp(-1.0, float(self.height) + 1.0)
        cell_x = torch.floor(grid_x)
        cell_y = torch.floor(grid_y)
        offset = torch.stack([grid_x - cell_x, grid_y - cell_y], dim=1) * 2.0 - 1.0
        ix = cell_x.to(torch.long)
        iy = cell_y.to(torch.long)
        in_grid = valid & (ix >= 0) & (ix < self.width) & (iy >= 0) & (iy < self.height)
        cells_per_frame = self.width * self.height
        cell = batch_index * cells_per_frame + iy * self.width + ix
        cell = torch.where(in_grid, cell, torch.full_like(cell, batch_size * cells_per_frame))
        return cell, in_grid, offset


class PointEncoder(nn.Module):
    """Stage 2: a per-point MLP over normalised raw features.

    Inputs per point: x and y scaled by the grid's half extent, z by ``height_scale_m``, intensity, the
    offset inside its BEV cell (which the cell pooling would otherwise lose) and the planar range scaled
    like x/y (sparsity and intensity both depend on range). No normalisation layer mixes points, so a
    point's features depend on that point only. The last activation is a ReLU, so features are >= 0,
    which max pooling relies on (empty cells hold 0).
    """

    def __init__(self, config: BEVSegNetConfig) -> None:
        super().__init__()
        x_low, x_high = config.x_range_m
        y_low, y_high = config.y_range_m
        self.x_center = float((x_low + x_high) / 2)
        self.y_center = float((y_low + y_high) / 2)
        self.xy_scale = float(max(x_high - x_low, y_high - y_low) / 2)
        self.z_scale = float(config.height_scale_m)
        layers: list[nn.Module] = []
        in_channels = POINT_INPUT_FEATURES
        for width in config.point_channels:
            layers += [nn.Linear(in_channels, width), nn.ReLU(inplace=True)]
            in_channels = width
        self.mlp = nn.Sequential(*layers)
        self.out_channels = in_channels

    def forward(self, points: Tensor, offset: Tensor) -> Tensor:
        """``points`` [M, 4] (x, y, z, intensity), ``offset`` [M, 2] -> features [M, C]."""
        x = (points[:, 0:1] - self.x_center) / self.xy_scale
        y = (points[:, 1:2] - self.y_center) / self.xy_scale
        z = points[:, 2:3] / self.z_scale
        intensity = points[:, 3:4]
        planar_range = torch.sqrt(points[:, 0:1] ** 2 + points[:, 1:2] ** 2 + 1e-12) / self.xy_scale
        return self.mlp(torch.cat([x, y, z, intensity, offset, planar_range], dim=1))


class BEVScatter(nn.Module):
    """Stage 3: pools point features into a dense BEV image with ``scatter_reduce`` / ``scatter_add``.

    One extra channel, log(1 + points in the cell), tells the backbone about density and empty cells.
    Points routed to the trash cell (padded or out of grid) land in an extra row that is cut off, so
    they change nothing. Returns the image [B, C+1, H, W] and the per-cell table [B*H*W, C+1] for the
    point-level gather.
    """

    def __init__(self, config: BEVSegNetConfig, in_channels: int) -> None:
        super().__init__()
        self.width, self.height = config.grid_size()
        self.use_max = config.pooling == "max"
        self.out_channels = in_channels + 1

    def forward(self, features: Tensor, cell: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        """``features`` [M, C], ``cell`` [M] flat cell ids (trash = B*H*W) -> (image, cell table)."""
        num_cells = batch_size * self.height * self.width
        channels = features.shape[1]
        index = cell.unsqueeze(1).expand(-1, channels)
        # +1 row: the trash cell.
        pooled = features.new_zeros([num_cells + 1, channels])
        ones = torch.ones_like(cell, dtype=features.dtype)
        counts = features.new_zeros([num_cells + 1]).scatter_add(0, cell, ones)
        if self.use_max:
            # Features are >= 0 (ReLU), so starting from zeros with include_self is an exact max and
            # leaves empty cells at 0.
            pooled = pooled.scatter_reduce(0, index, features, reduce="amax", include_self=True)
        else:
            pooled = pooled.scatter_add(0, index, features) / counts.clamp(min=1.0).unsqueeze(1)
        table = torch.cat([pooled, torch.log1p(counts).unsqueeze(1)], dim=1)[:num_cells]
        image = table.reshape(batch_size, self.height, self.width, channels + 1).permute(0, 3, 1, 2)
        return image.contiguous(), table


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm follows) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BEVBackbone(nn.Module):
    """Stage 4: a small 2D encoder-decoder over the BEV image (U-Net/FPN-like).

    Level i is a stride-2 conv block plus ``blocks_per_level`` 3x3 blocks at ``backbone_channels[i]``;
    so level 0 runs at half the grid resolution (a full-resolution conv would cost 4x for little gain:
    the per-cell detail reaches the head through the gathered cell feature instead). The decoder
    projects every level to ``neck_channels`` with a 1x1 conv and adds the nearest-upsampled coarser
    level, top-down, ending at level 0's resolution (stride 2), followed by one 3x3 block to smooth the
    upsampling seams.
    """

    def __init__(self, config: BEVSegNetConfig, in_channels: int) -> None:
        super().__init__()
        levels: list[nn.Module] = []
        laterals: list[nn.Module] = []
        previous = in_channels
        for width in config.backbone_channels:
            blocks = [_conv_block(previous, width, stride=2)]
            blocks += [_conv_block(width, width, stride=1) for _ in range(config.blocks_per_level)]
            levels.append(nn.Sequential(*blocks))
            laterals.append(nn.Conv2d(width, config.neck_channels, kernel_size=1))
            previous = width
        self.levels = nn.ModuleList(levels)
        self.laterals = nn.ModuleList(laterals)
        self.smooth = _conv_block(config.neck_channels, config.neck_channels, stride=1)
        self.out_channels = config.neck_channels
        self.out_stride = 2

    def forward(self, image: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, neck, ceil(H/2), ceil(W/2)]."""
        features: list[Tensor] = []
        x = image
        for level in self.levels:
            x = level(x)
            features.append(x)
        projected: list[Tensor] = []
        for i, lateral in enumerate(self.laterals):
            projected.append(lateral(features[i]))
        top_down = projected[-1]
        for i in range(len(projected) - 2, -1, -1):
            finer = projected[i]
            top_down = finer + F.interpolate(top_down, size=[finer.shape[2], finer.shape[3]], mode="nearest")
        return self.smooth(top_down)


class BEVGather(nn.Module):
    """Stage 5: reads per-cell features back at every point with ``index_select``.

    A zero row is appended to each table and points in the trash cell read it, so out-of-grid and
    padded points get an all-zero BEV feature rather than some edge cell's.
    """

    def __init__(self, config: BEVSegNetConfig, stride: int) -> None:
        super().__init__()
        self.width, self.height = config.grid_size()
        self.stride = stride
        self.coarse_width = (self.width + stride - 1) // stride
        self.coarse_height = (self.height + stride - 1) // stride

    def forward(
        self, cell_table: Tensor, bev: Tensor, cell: Tensor, in_grid: Tensor, batch_size: int
    ) -> tuple[Tensor, Tensor]:
        """(cell table [B*H*W, C1], BEV [B, C2, h, w], cell [M], in_grid [M]) -> ([M, C1], [M, C2])."""
        cells_per_frame = self.width * self.height
        zero_cell = cell_table.new_zeros([1, cell_table.shape[1]])
        cell_features = torch.cat([cell_table, zero_cell], dim=0).index_select(0, cell)

        # The same point's cell at the backbone's output stride; recomputed from the fine cell id.
        fine = cell.clamp(max=batch_size * cells_per_frame - 1)
        batch_index = fine // cells_per_frame
        within = fine - batch_index * cells_per_frame
        iy = (within // self.width) // self.stride
        ix = (within % self.width) // self.stride
        coarse_cells = self.coarse_width * self.coarse_height
        coarse = batch_index * coarse_cells + iy * self.coarse_width + ix
        coarse = torch.where(in_grid, coarse, torch.full_like(coarse, batch_size * coarse_cells))
        channels = bev.shape[1]
        coarse_table = bev.permute(0, 2, 3, 1).reshape(batch_size * coarse_cells, channels)
        zero_coarse = bev.new_zeros([1, channels])
        bev_features = torch.cat([coarse_table, zero_coarse], dim=0).index_select(0, coarse)
        return cell_features, bev_features


class PointHead(nn.Module):
    """Stage 6: per-point classifier over [point features, cell features, BEV context, in-grid flag]."""

    def __init__(self, config: BEVSegNetConfig, in_channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, config.head_channels),
            nn.ReLU(inplace=True),
            nn.Linear(config.head_channels, config.num_classes),
        )

    def forward(self, features: Tensor) -> Tensor:
        """[M, C] -> logits [M, num_classes]."""
        return self.mlp(features)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class BEVSegNet(nn.Module):
    """Per-point semantic segmentation through a BEV grid; see the module docstring for the stages."""

    # The config dataclass is for Python callers (checkpoints, logs); TorchScript need not type it.
    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: BEVSegNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.num_classes = config.num_classes
        self.grid = BEVGrid(config)
        self.point_encoder = PointEncoder(config)
        self.scatter = BEVScatter(config, self.point_encoder.out_channels)
        self.backbone = BEVBackbone(config, self.scatter.out_channels)
        self.gather = BEVGather(config, self.backbone.out_stride)
        # point features + cell features (incl. the density channel) + BEV context + in-grid flag
        head_inputs = (
            self.point_encoder.out_channels + self.scatter.out_channels + self.backbone.out_channels + 1
        )
        self.head = PointHead(config, head_inputs)

    def forward(self, points: Tensor, valid: Tensor) -> Tensor:
        """``points`` [B, N, 4] float32 (x, y, z, intensity), ``valid`` [B, N] bool -> logits [B, N, K]."""
        batch_size = points.shape[0]
        num_points = points.shape[1]
        # A no-op on well-formed input; under torch.export it tells the tracer that valid's dims *are*
        # points' dims (one symbol each), without which it guards on N != 1.
        flat_valid = valid.expand(batch_size, num_points).reshape(-1)
        # Zero padded points so that whatever the padding holds (even NaN) cannot reach any output.
        flat_points = points.reshape(-1, 4)
        flat_points = torch.where(flat_valid.unsqueeze(1), flat_points, torch.zeros_like(flat_points))
        batch_index = torch.arange(batch_size, device=points.device).unsqueeze(1)
        batch_index = batch_index.expand(batch_size, num_points).reshape(-1)

        cell, in_grid, offset = self.grid(flat_points[:, 0:2], flat_valid, batch_index, batch_size)
        point_features = self.point_encoder(flat_points, offset)
        image, cell_table = self.scatter(point_features, cell, batch_size)
        bev = self.backbone(image)
        cell_features, bev_features = self.gather(cell_table, bev, cell, in_grid, batch_size)
        in_grid_flag = in_grid.to(points.dtype).unsqueeze(1)
        head_input = torch.cat([point_features, cell_features, bev_features, in_grid_flag], dim=1)
        logits = self.head(head_input)
        return logits.reshape(batch_size, num_points, self.num_classes)

    def model_info(self) -> dict:
        """Parameter counts per stage and the config (see ``registry.model_info``)."""
        return model_info(self)


def build_bev_segnet(config: BEVSegNetConfig) -> BEVSegNet:
    """Builder registered under ``bev_segnet``."""
    return BEVSegNet(config)


register_model(
    "bev_segnet",
    BEVSegNetConfig,
    build_bev_segnet,
    description="Lyft-style per-point LiDAR segmenter: point MLP -> BEV scatter -> 2D conv -> gather -> head",
)
