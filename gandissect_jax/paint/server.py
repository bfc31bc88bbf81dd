"""The GANPaint web app: a FastAPI JSON API over dissected generators, and the single-page client.

``create_app(models)`` serves one or more :class:`~gandissect_jax.paint.model.PaintModel`:

========================================  ==========================================================
``GET  /``                                the client (``static/index.html``, plain JS modules)
``GET  /api/models``                      models: layers, labels and their colours, sizes, limits
``GET  /api/models/{m}/layers/{l}/concepts``  paintable concepts, ranking metric (ace / iou), top units
``GET  /api/models/{m}/layers/{l}/units``     every unit: its dissection label, IoU, insertion value
``POST /api/generate``                    images and segmentations for seeds or z
``POST /api/edit``                        strokes -> edited image (PNG), segmentation, share changes
``POST /api/photos``                      upload a photo: inverted into the generator (z, then r)
``GET  /openapi.json``                    the schema of all of the above
========================================  ==========================================================

Images travel as PNG data URLs. A segmentation travels as a PNG whose pixel (R, G, B) holds the
label number ``R + 256 G`` of the pixel's first non-zero segmentation channel (exact, any
vocabulary up to 65,536 labels); ``/api/models`` gives the names and colours. Masks are PNG data
URLs (painted where alpha > 0 -- the coverage is alpha / 255 -- or, without alpha, where the
grey value is > 0) or 2-D lists of numbers in [0, 1], at any resolution with the image's aspect
ratio.

Requests are validated by pydantic models: malformed JSON, unknown models, layers, concepts or
photos, masks of the wrong shape or too large, and too many strokes get a 4xx JSON error
``{"detail": ...}``; nothing is written to disk per request.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import time
from importlib import resources
from typing import Annotated, Mapping, Sequence

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field

from .edits import MODES, Stroke
from .model import EditResult, PaintModel
from .schema import (MAX_BODY_BYTES, MAX_MASK_SIDE, ConceptOut, EditIn, EditOut, GenerateIn, GenerateOut, ImageOut,
                     LabelOut, LayerOut, ModelOut, PhotoIn, PhotoOut, Share, StrokeUnits, UnitOut)

__all__ = ["create_app", "MAX_MASK_SIDE", "MAX_BODY_BYTES"]

logger = logging.getLogger("gandissect_jax.paint")


# ---------------------------------------------------------------------------------------- codecs


def png_data_url(image: np.ndarray) -> str:
    """PNG data URL of a uint8 (H, W, 3) image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def label_png(labels: np.ndarray) -> str:
    """PNG data URL of int (H, W, D) labels: the first non-zero channel as R + 256 G."""
    first = np.asarray(labels[..., 0]).copy()
    for d in range(1, labels.shape[-1]):
        first = np.where(first == 0, labels[..., d], first)
    first = np.clip(first, 0, 65535).astype(np.uint32)
    rgb = np.stack([first & 255, first >> 8, np.zeros_like(first)], axis=-1).astype(np.uint8)
    return png_data_url(rgb)


def decode_image(data_url: str, what: str):
    """A PIL image from a data URL (PNG or JPEG), its size checked before its pixels are decoded.

    Raises HTTPException 422 (malformed) or 413 (over MAX_MASK_SIDE per side)."""
    from PIL import Image, UnidentifiedImageError

    header, comma, payload = data_url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise HTTPException(422, f"{what} must be a base64 image data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{what}: invalid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{what}: the image is too large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise HTTPException(422, f"{what}: not a readable PNG or JPEG image") from None
    if image.format not in ("PNG", "JPEG"):
        raise HTTPException(422, f"{what}: {image.format} images are not accepted (PNG or JPEG)")
    width, height = image.size
    if width > MAX_MASK_SIDE or height > MAX_MASK_SIDE:
        raise HTTPException(413, f"{what} is {width}x{height} pixels; at most {MAX_MASK_SIDE} per side")
    if width < 1 or height < 1:
        raise HTTPException(422, f"{what} is empty")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise HTTPException(422, f"{what}: the image data is corrupt") from None
    return image


def decode_mask(mask: str | list[list[float]], what: str) -> np.ndarray:
    """float32 (h, w) in [0, 1] from a stroke's mask field. HTTPException 4xx when malformed."""
    if isinstance(mask, str):
        image = decode_image(mask, what)
        if "A" in image.getbands() or "transparency" in image.info:
            alpha = np.asarray(image.convert("RGBA"))[..., 3]
            return alpha.astype(np.float32) / 255.0
        return np.asarray(image.convert("L")).astype(np.float32) / 255.0
    rows = len(mask)
    if rows == 0 or any(len(row) != len(mask[0]) for row in mask) or len(mask[0]) == 0:
        raise HTTPException(422, f"{what}: rows must be non-empty and of equal length")
    if rows > MAX_MASK_SIDE or len(mask[0]) > MAX_MASK_SIDE:
        raise HTTPException(413, f"{what} is {rows}x{len(mask[0])}; at most {MAX_MASK_SIDE} per side")
    array = np.asarray(mask, np.float32)
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise HTTPException(422, f"{what}: values must be finite numbers in [0, 1]")
    return array


def _fraction(count, total) -> float | None:
    return float(count) / float(total) if total else None


def shares_of(counts: np.ndarray, label_names: Sequence[str]) -> list[Share]:
    """Per label, shares before / after in the whole image and inside / outside the region, from
    int (2, 2, L) counts [original / edited, inside / outside, label]; labels never seen are left out."""
    whole = counts.sum(axis=1)  # (2, L)
    totals = whole.sum(axis=1)
    part_totals = counts.sum(axis=2)  # (2, 2)
    result = []
    for label in np.flatnonzero(whole.sum(axis=0)):
        result.append(Share(
            label=label_names[label],
            before=_fraction(whole[0, label], totals[0]) or 0.0, after=_fraction(whole[1, label], totals[1]) or 0.0,
            inside_before=_fraction(counts[0, 0, label], part_totals[0, 0]),
            inside_after=_fraction(counts[1, 0, label], part_totals[1, 0]),
            outside_before=_fraction(counts[0, 1, label], part_totals[0, 1]),
            outside_after=_fraction(counts[1, 1, label], part_totals[1, 1])))
    return result


def _color(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


# ---------------------------------------------------------------------------------------- app


class BodyLimit:
    """ASGI middleware: request bodies over ``limit`` bytes get 413 (by Content-Length, or while
    streaming a body without one), before anything parses them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await JSONResponse({"detail": "invalid Content-Length"}, status_code=400)(scope, receive, send)
            if declared > self.limit:
                return await JSONResponse({"detail": f"request body over {self.limit} bytes"},
                                          status_code=413)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def create_app(models: Sequence[PaintModel] | Mapping[str, PaintModel]) -> FastAPI:
    """The GANPaint FastAPI app over ``models`` (names must be unique).

    Run it with ``uvicorn.run(app, host=..., port=...)`` (``gandissect-jax paint`` does).
    """
    from gandissect_jax.dissection.labels import palette

    if isinstance(models, Mapping):
        models = list(models.values())
    registry: dict[str, PaintModel] = {}
    for model in models:
        if model.name in registry:
            raise ValueError(f"two models are named {model.name!r}")
        registry[model.name] = model
    if not registry:
        raise ValueError("no models to serve")

    app = FastAPI(title="GANPaint (gandissect-jax)", version="1",
                  description=__doc__.split("\n\n")[0], docs_url=None, redoc_url=None)
    static = resources.files("gandissect_jax.paint") / "static"

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        errors = [{key: (value if key != "input" else _short(value)) for key, value in e.items() if key != "ctx"}
                  for e in err.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # never a traceback in a response
        logger.exception("internal error in %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(err).__name__})"}, status_code=500)

    def model_of(name: str) -> PaintModel:
        if name not in registry:
            raise HTTPException(404, f"unknown model {name!r}; models: {', '.join(registry)}")
        return registry[name]

    def layer_of(model: PaintModel, layer: str | None) -> str:
        layer = layer or model.default_layer
        if layer not in model.layers:
            raise HTTPException(404, f"layer {layer!r} is not dissected in {model.name!r}; "
                                     f"layers: {', '.join(model.layers)}")
        return layer

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/health", include_in_schema=False)
    def health():
        return {"ok": True, "models": list(registry)}

    @app.get("/api/models", response_model=list[ModelOut])
    def list_models():
        """Every model: its dissected layers, label names and colours, image sizes and limits."""
        out = []
        for model in registry.values():
            colors = palette(len(model.label_names))
            out.append(ModelOut(
                name=model.name, title=model.info.get("title"), image_size=list(model.image_shape),
                segmentation_size=list(model.seg_shape), z_dim=model.z_dim,
                layers=[LayerOut(layer=layer, shape=list(model.layer_shapes[layer]), num_units=ranking.num_units,
                                 interpretable=int(ranking.interpretable.sum()))
                        for layer, ranking in model.layers.items()],
                default_layer=model.default_layer,
                labels=[LabelOut(label=name, color=_color(colors[i])) for i, name in enumerate(model.label_names)],
                max_strokes=model.max_strokes, default_top=model.default_top, modes=list(MODES),
                info={k: v for k, v in model.info.items() if k in ("model", "segmenter", "title")}))
        return out

    @app.get("/api/models/{model}/layers/{layer}/concepts", response_model=list[ConceptOut])
    def concepts(model: str, layer: str, top: Annotated[int | None, Field(ge=1, le=65536)] = None):
        """The paintable concepts of a layer with the ranking used (ACE when fitted, else IoU)
        and their top units (``top``, default the model's units per stroke)."""
        m = model_of(model)
        ranking = m.ranking(layer_of(m, layer))
        k = min(top or m.default_top, ranking.num_units)
        out = []
        for concept in ranking.concepts:
            units = ranking.order[concept][:k]
            label = m.label_names.index(concept)
            out.append(ConceptOut(concept=concept, metric=ranking.metric[concept], units=units.tolist(),
                                  iou=[float(ranking.iou[label, u]) for u in units]))
        return out

    @app.get("/api/models/{model}/layers/{layer}/units", response_model=list[UnitOut])
    def units(model: str, layer: str):
        """Every unit of a layer: its dissection label, IoU and insertion value."""
        m = model_of(model)
        ranking = m.ranking(layer_of(m, layer))
        return [_unit(ranking, u) for u in range(ranking.num_units)]

    @app.post("/api/generate", response_model=GenerateOut)
    def generate(request: GenerateIn):
        """Images and their segmentations for seeds (``z = sample_z(1, z_dim, seed)``) or z."""
        m = model_of(request.model)
        if request.seeds is not None:
            z = np.stack([m.z_for_seed(s) for s in request.seeds]) if request.seeds else np.zeros((0, m.z_dim))
            seeds = list(request.seeds)
        else:
            z = _z_array(request.z, m.z_dim)
            seeds = [None] * len(z)
        if len(z) == 0:
            return GenerateOut(images=[])
        images, labels = m.generate(z)
        return GenerateOut(images=[ImageOut(seed=s, image=png_data_url(x), segmentation=label_png(l))
                                   for s, x, l in zip(seeds, images, labels)])

    @app.post("/api/edit", response_model=EditOut)
    def edit(request: EditIn):
        """Apply strokes to one image (a seed, a z or an uploaded photo) at a layer."""
        start = time.perf_counter()
        m = model_of(request.model)
        layer = layer_of(m, request.layer)
        if len(request.strokes) > m.max_strokes:
            raise HTTPException(422, f"{len(request.strokes)} strokes; at most {m.max_strokes} per edit")
        strokes = [Stroke(mask=decode_mask(s.mask, f"strokes[{i}].mask"), concept=s.concept, mode=s.mode,
                          strength=s.strength, units=s.units, top=s.top) for i, s in enumerate(request.strokes)]
        z = None
        if request.seed is not None:
            z = m.z_for_seed(request.seed)
        elif request.z is not None:
            z = _z_array([request.z], m.z_dim)[0]
        try:
            result = m.edit(layer, strokes, z=z, photo=request.photo)
        except KeyError as err:
            raise HTTPException(404, str(err.args[0])) from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        return _edit_out(m, layer, result, start)

    @app.post("/api/photos", response_model=PhotoOut)
    def photos(request: PhotoIn):
        """Upload a photo: it is cropped to a centred square, resized to the generator's size and
        inverted (z, then r at the layer); edit it with ``{"photo": id}``. Takes seconds."""
        from PIL import Image

        start = time.perf_counter()
        m = model_of(request.model)
        layer = layer_of(m, request.layer)
        image = decode_image(request.image, "image").convert("RGB")
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((m.image_shape[1], m.image_shape[0]), Image.Resampling.LANCZOS)
        inversion = m.invert_photo(layer, np.asarray(image, np.uint8))
        return PhotoOut(photo=inversion.id, layer=layer, image=png_data_url(inversion.photo),
                        reconstruction_z=png_data_url(inversion.reconstruction_z),
                        reconstruction=png_data_url(inversion.reconstruction), psnr_z=inversion.psnr_z,
                        psnr_r=inversion.psnr_r, elapsed_ms=1000 * (time.perf_counter() - start))

    return app


def _short(value):
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _z_array(rows: list[list[float]], z_dim: int) -> np.ndarray:
    z = np.asarray(rows, np.float64) if rows else np.zeros((0, z_dim))
    if z.ndim != 2 or z.shape[1] != z_dim:
        raise HTTPException(422, f"z must be rows of {z_dim} numbers")
    if not np.all(np.isfinite(z)) or np.abs(z).max(initial=0) > 1e4:
        raise HTTPException(422, "z must be finite numbers of magnitude <= 1e4")
    return z.astype(np.float32)


def _unit(ranking, unit: int) -> UnitOut:
    iou = float(ranking.unit_iou[unit])
    return UnitOut(unit=int(unit), label=ranking.unit_label_name(unit), iou=iou if math.isfinite(iou) else 0.0,
                   interpretable=bool(ranking.interpretable[unit]),
                   insertion_value=float(ranking.insertion_values[unit]))


def _edit_out(m: PaintModel, layer: str, result: EditResult, start: float) -> EditOut:
    ranking = m.layers[layer]
    return EditOut(
        model=m.name, layer=layer, image=png_data_url(result.image),
        generated=png_data_url(result.edited) if result.photo else None,
        original=png_data_url(result.before), segmentation=label_png(result.edited_labels),
        original_segmentation=label_png(result.original_labels), shares=shares_of(result.counts, m.label_names),
        region_fraction=float(result.region.mean()),
        strokes=[StrokeUnits(stroke=i, units=[_unit(ranking, u) for u in units]) for i, units in enumerate(result.units)],
        elapsed_ms=1000 * (time.perf_counter() - start))
