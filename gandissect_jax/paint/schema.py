"""The paint web app's request and response schemas (pydantic models, validated before any work) and its size limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


MAX_MASK_SIDE = 4096  # pixels per side of a mask or photo
MAX_BODY_BYTES = 16 * 1024 * 1024  # a request body
MAX_IMAGES = 64  # images per generate request

DataURL = Annotated[str, Field(max_length=MAX_BODY_BYTES, description="a PNG (or JPEG) data URL")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrokeIn(_Strict):
    """One stroke: a concept's top units (or given units) turned on (add) or off (remove) under a mask."""

    concept: str | None = Field(None, max_length=200, description="concept name, e.g. 'tree'")
    units: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=65536, description="unit numbers (a unit-level edit); replace the concept's top units")
    mode: Literal["add", "remove"] = Field("add", description="add: insert the units; remove: ablate them")
    mask: DataURL | list[list[float]] = Field(
        description="image-space mask, any resolution with the image's aspect ratio: a PNG data URL "
                    "(alpha / 255 where it has alpha, else grey / 255) or rows of numbers in [0, 1]")
    strength: float = Field(1.0, ge=0.0, le=1.0, description="the edit's weight")
    top: int | None = Field(None, ge=1, le=65536, description="how many of the concept's top units")

    @model_validator(mode="after")
    def _concept_or_units(self):
        if self.concept is None and self.units is None:
            raise ValueError("a stroke needs a concept or units")
        return self


class EditIn(_Strict):
    """An edit of one image: the strokes so far, in order (the server keeps no state per image)."""

    model: str = Field(max_length=200)
    layer: str | None = Field(None, max_length=200, description="default: the model's first dissected layer")
    seed: int | None = Field(None, ge=0, lt=2**32, description="z = sample_z(1, z_dim, seed)")
    z: list[float] | None = Field(None, max_length=65536)
    photo: str | None = Field(None, max_length=64, description="an id from POST /api/photos")
    strokes: list[StrokeIn] = Field(default_factory=list, max_length=1024)

    @model_validator(mode="after")
    def _one_source(self):
        given = [name for name in ("seed", "z", "photo") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of seed, z, photo (got {', '.join(given) or 'none'})")
        return self


class GenerateIn(_Strict):
    model: str = Field(max_length=200)
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] | None = Field(None, max_length=MAX_IMAGES)
    z: list[list[float]] | None = Field(None, max_length=MAX_IMAGES)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.seeds is None) == (self.z is None):
            raise ValueError("give seeds or z (not both)")
        return self


class PhotoIn(_Strict):
    model: str = Field(max_length=200)
    layer: str | None = Field(None, max_length=200)
    image: DataURL


class Share(BaseModel):
    label: str
    before: float
    after: float
    inside_before: float | None
    inside_after: float | None
    outside_before: float | None
    outside_after: float | None


class UnitOut(BaseModel):
    unit: int
    label: str
    iou: float
    interpretable: bool
    insertion_value: float


class StrokeUnits(BaseModel):
    stroke: int
    units: list[UnitOut]


class EditOut(BaseModel):
    model: str
    layer: str
    image: str = Field(description="PNG data URL of the result (for a photo: the edit blended into it)")
    generated: str | None = Field(description="for a photo: PNG data URL of the edited generator image")
    original: str = Field(description="PNG data URL of the image before the edit (generated, or the photo)")
    segmentation: str = Field(description="PNG data URL: label number R + 256 G of `image`")
    original_segmentation: str = Field(description="the same of `original`")
    shares: list[Share] = Field(description="label shares (entries of every channel) before and after, "
                                            "in the whole image and inside / outside the painted region")
    region_fraction: float
    strokes: list[StrokeUnits]
    elapsed_ms: float


class ImageOut(BaseModel):
    seed: int | None
    image: str
    segmentation: str


class GenerateOut(BaseModel):
    images: list[ImageOut]


class PhotoOut(BaseModel):
    photo: str
    layer: str
    image: str = Field(description="the photo at the generator's size")
    reconstruction_z: str
    reconstruction: str
    psnr_z: float
    psnr_r: float
    elapsed_ms: float


class LayerOut(BaseModel):
    layer: str
    shape: list[int]
    num_units: int
    interpretable: int


class LabelOut(BaseModel):
    label: str
    color: str


class ModelOut(BaseModel):
    name: str
    title: str | None
    image_size: list[int]
    segmentation_size: list[int]
    z_dim: int
    layers: list[LayerOut]
    default_layer: str
    labels: list[LabelOut]
    max_strokes: int
    default_top: int
    modes: list[str]
    info: dict


class ConceptOut(BaseModel):
    concept: str
    metric: Literal["ace", "iou"]
    units: list[int]
    iou: list[float]
