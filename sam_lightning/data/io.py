"""Reading images and masks from disk, and turning mask files into instance masks.

Images of any common kind (JPEG/PNG/TIFF; greyscale, RGBA, 16-bit) become RGB uint8 with their
EXIF orientation applied, because that is what a person sees in an image viewer and what the
labelling tool drew on. Mask files are interpreted strictly by their declared format: a value
that does not fit (for example the smeared edges of a JPEG-compressed mask) is reported as an
`InvalidSample`, never guessed at.

Mask formats:
    binary      0/255 or 0/1; all foreground pixels are one object.
    components  0/255 or 0/1; each 8-connected foreground component is one object.
    instance    0 is background, each value k > 0 is instance k.
    semantic    class ids; each 8-connected component of each (kept) class is one object.
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_lightning.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
MASK_FORMATS = ("binary", "components", "instance", "semantic")
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")
#: bump when what a check accepts, refuses or corrects changes: the validation cache then re-checks
#: every sample (`sam_lightning.data.validation`)
READER_VERSION = 1

# kinds of problems a sample can have; validation counts them under these names
BAD_IMAGE = "image does not decode"
MISSING_IMAGE = "image missing"
MISSING_MASK = "mask missing"
BAD_MASK = "mask does not decode"
SIZE_MISMATCH = "mask size differs from image"
BAD_MASK_VALUES = "mask values do not fit the format"
LOSSY_MASK = "mask saved in a lossy format"
NO_INSTANCES = "no instance"
BAD_ANNOTATION = "annotation does not decode"
DEGENERATE_POLYGON = "polygon with fewer than 3 points"
ORPHAN_ANNOTATION = "annotation of no image"
# a correction, not a problem: the sample is used, and the report counts it
CLIPPED = "annotation reaches outside its image (clipped to it)"


class InvalidSample(DataError):
    """One sample cannot be used; `kind` groups it in the validation report, `path` names it."""

    def __init__(self, kind: str, path: str | Path, detail: str) -> None:
        self.kind = kind
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{path}: {kind}: {detail}")


@dataclass(frozen=True)
class Correction:
    """A sample that is used after a fix the reader made (an annotation clipped to its image);
    `check` returns these and the validation report counts them by `kind`."""

    kind: str
    path: str
    detail: str


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Map any numeric array to uint8: 8-bit as is, wider types stretched from min to max.

    16-bit and float images rarely use their whole range (a 12-bit camera, a 0-1 float TIFF),
    so dividing by the type's maximum would give near-black images; a per-image linear stretch
    keeps the content visible, which is what the image encoder needs.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, dtype=np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if array.dtype.kind in "ui" and lo >= 0 and hi <= 255:
        return array.astype(np.uint8)
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    out = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _rgb(array: np.ndarray) -> np.ndarray:
    """HW, HW1, HW2 (grey + alpha), HW3 or HW4 (RGBA) numeric array -> HW3 uint8."""
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[2]
    if channels in (2, 4):  # drop alpha: labelling tools show the colour, not the transparency
        array = array[..., : channels - 1]
        channels -= 1
    array = _to_uint8(array)
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels != 3:
        raise ValueError(f"{channels} channels")
    return np.ascontiguousarray(array)


def read_image(path: str | Path, draft_size: int | None = None, strict: bool = False) -> np.ndarray:
    """Read an image as RGB uint8 HWC with its EXIF orientation applied.

    Args:
        path: JPEG, PNG, TIFF, BMP or WebP file.
        draft_size: if given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
            cheap DCT scaling) as long as its longest side stays >= draft_size; the image is
            resized to that side afterwards anyway, and decoding is the slowest step.
        strict: decode with Pillow only, which refuses truncated files (validation uses it).
            Otherwise plain RGB/grey JPEGs are decoded by OpenCV (as SAM's own examples do;
            EXIF orientation applied): Pillow's decode plus its copy into numpy costs about 3x
            more, the largest share of a training sample.

    Raises:
        InvalidSample: the file is missing or does not decode.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidSample(MISSING_IMAGE, path, "no such file; check data.root and the file names")
    try:
        if not strict and draft_size is None:
            with Image.open(path) as img:
                fast = img.format == "JPEG" and img.mode in ("RGB", "L")
            if fast:
                bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if bgr is not None:
                    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        array = _read_with_pillow(path, draft_size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # Pillow cannot open some TIFFs (16-bit RGB); anything else it refuses is broken
        array = _read_with_opencv(path) if path.suffix.lower() in (".tif", ".tiff") else None
        if array is None:
            raise InvalidSample(
                BAD_IMAGE, path, f"cannot decode ({err}); re-export it as PNG or JPEG"
            ) from None
    try:
        return _rgb(array)
    except ValueError as err:
        raise InvalidSample(
            BAD_IMAGE, path, f"unsupported layout ({err}); expected grey, RGB or RGBA"
        ) from None


def read_image_bytes(raw: bytes, path: str | Path, what: str = "image data") -> np.ndarray:
    """An encoded image held in memory (LabelMe's embedded `imageData`) as `read_image` reads a
    file: RGB uint8 HWC, EXIF orientation applied.

    Raises:
        InvalidSample: the bytes do not decode; `path` (the file that holds them) is named.
    """
    try:
        return _rgb(_read_with_pillow(_io.BytesIO(raw), None))  # type: ignore[arg-type]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidSample(
            BAD_IMAGE, path, f"{what} does not decode ({err}); save the file again"
        ) from None


def _read_with_pillow(path: Path, draft_size: int | None) -> np.ndarray:
    """Decode fully (truncated files raise), apply EXIF orientation, normalise odd modes."""
    with Image.open(path) as img:
        if draft_size is not None and img.format == "JPEG":
            _draft(img, draft_size)
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        elif img.mode == "1":
            img = img.convert("L")
        return np.asarray(img)


def _draft(img: Image.Image, min_side: int) -> None:
    """Ask libjpeg for the smallest DCT scale whose longest side is still >= `min_side`."""
    w, h = img.size
    scale = 1
    while max(w, h) // (scale * 2) >= min_side and scale < 8:
        scale *= 2
    if scale > 1:
        img.draft("RGB" if img.mode == "RGB" else img.mode, (w // scale, h // scale))


def _read_with_opencv(path: Path) -> np.ndarray | None:
    """Fallback for files Pillow cannot open (for example 16-bit RGB TIFF); RGB order."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if array is None:
        return None
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[..., ::-1]
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[..., [2, 1, 0, 3]]
    return array


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header only."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def verify_image(path: str | Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation of an image that decodes completely.

    What validation needs from an image, as strict as `read_image(strict=True)` (the same files
    refused, with the same kinds) but without the pixel conversions a training sample needs.
    JPEGs decode at 1/8 scale: libjpeg still entropy-decodes every byte, so a truncated or
    corrupt file fails exactly as in a full decode, and only the inverse DCT gets cheaper.

    Raises:
        InvalidSample: the file is missing or does not decode.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidSample(MISSING_IMAGE, path, "no such file; check data.root and the file names")
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
            if img.format == "JPEG":
                img.draft(None, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # the TIFFs Pillow cannot open go through OpenCV, as in `read_image`
        array = _read_with_opencv(path) if path.suffix.lower() in (".tif", ".tiff") else None
        if array is None:
            raise InvalidSample(
                BAD_IMAGE, path, f"cannot decode ({err}); re-export it as PNG or JPEG"
            ) from None
        channels = 1 if array.ndim == 2 else array.shape[2]
        if channels not in (1, 2, 3, 4):
            raise InvalidSample(
                BAD_IMAGE,
                path,
                f"unsupported layout ({channels} channels); expected grey, RGB or RGBA",
            ) from None
        return int(array.shape[0]), int(array.shape[1])
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def read_mask_array(path: str | Path) -> np.ndarray:
    """Read a mask file as a 2-D integer array of its stored values (no interpretation).

    Palette PNGs give their indices (the class or instance ids, as in Pascal VOC); RGB masks
    whose three channels are equal give one channel; other RGB masks give one id per colour
    (black is 0), the way many labelling tools export instances.

    Raises:
        InvalidSample: missing, undecodable, or saved as JPEG (whose compression smears values).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidSample(
            MISSING_MASK,
            path,
            "no such file; each image needs a mask with its stem (plus data.directory.mask_suffix): "
            "add the mask or remove the image",
        )
    try:
        with Image.open(path) as img:
            fmt = img.format
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
        fmt = None
        if array is None:
            raise InvalidSample(
                BAD_MASK, path, f"cannot decode ({err}); save masks as PNG"
            ) from None
    if fmt in LOSSY_FORMATS:
        raise InvalidSample(
            LOSSY_MASK,
            path,
            f"{fmt} compression changes label values at every edge; save masks losslessly as PNG",
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 3:
        array = _collapse_channels(array)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InvalidSample(
                BAD_MASK_VALUES, path, "float mask with non-integer values; store integer ids"
            )
        array = array.astype(np.int64)
    if array.dtype.kind not in "ui":
        raise InvalidSample(
            BAD_MASK, path, f"unsupported pixel type {array.dtype}; save masks as PNG"
        )
    return array


def _collapse_channels(array: np.ndarray) -> np.ndarray:
    """HWC mask -> HW ids: equal channels give one channel, colours give one id each."""
    if array.shape[2] in (2, 4):  # alpha is not a label
        array = array[..., : array.shape[2] - 1]
    if array.shape[2] == 1 or np.all(array == array[..., :1]):
        return array[..., 0]
    flat = array.reshape(-1, array.shape[2]).astype(np.int64)
    packed = (flat[:, 0] << 32) | (flat[:, 1] << 16) | flat[:, 2]
    colours, ids = np.unique(packed, return_inverse=True)
    if colours[0] != 0:  # no black pixel: every colour is an object
        ids = ids + 1
    return ids.reshape(array.shape[:2]).astype(np.int32)


def distinct_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer mask; a histogram for 8/16-bit masks (several
    times faster than `np.unique` on a 2 MP mask, which matters once per sample)."""
    if array.dtype == np.uint8:
        hist = cv2.calcHist([np.ascontiguousarray(array)], [0], None, [256], [0, 256])
        return np.flatnonzero(hist.ravel()).astype(np.uint8)
    if array.dtype == np.uint16:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=1)).astype(np.uint16)
    return np.unique(array)


def check_mask_values(
    array: np.ndarray,
    mask_format: str,
    path: str | Path,
    num_classes: int | None = None,
    values: np.ndarray | None = None,
) -> None:
    """Raise `InvalidSample` if the stored values do not fit the declared format.

    binary/components must hold only {0, 1} or only {0, 255}; instance ids must be >= 0;
    semantic class ids must be >= 0 and below `num_classes` when that is known.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"unknown mask format {mask_format!r}; expected one of {MASK_FORMATS}")
    values = distinct_values(array) if values is None else values
    if mask_format in ("binary", "components"):
        if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
            return
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        hint = (
            "values between 0 and 255 look like a JPEG-compressed or anti-aliased mask; "
            "re-export it as PNG"
            if len(values) > 3
            else "if each value is an object set data.directory.mask_format=instance or semantic"
        )
        raise InvalidSample(
            BAD_MASK_VALUES,
            path,
            f"{len(values)} distinct values ({shown}); a {mask_format} mask holds only 0/1 or 0/255; {hint}",
        )
    if values.size and values[0] < 0:
        raise InvalidSample(BAD_MASK_VALUES, path, f"negative value {values[0]}; ids must be >= 0")
    if (
        mask_format == "semantic"
        and num_classes is not None
        and values.size
        and values[-1] >= num_classes
    ):
        raise InvalidSample(
            BAD_MASK_VALUES,
            path,
            f"class id {values[-1]} but data.directory.num_classes={num_classes}; fix the mask "
            "or the setting",
        )


def _components(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool image: (labels int32, count)."""
    count, labels = cv2.connectedComponents(
        binary.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    return labels, count - 1


def _kept_classes(
    values: np.ndarray, classes: Sequence[int] | None, ignore_index: int | None
) -> list[int]:
    """The semantic class ids of `values` that become objects."""
    return [
        int(c) for c in values if c > 0 and c != ignore_index and (classes is None or c in classes)
    ]


def has_instance(
    array: np.ndarray,
    mask_format: str,
    path: str | Path = "<mask>",
    classes: Sequence[int] | None = None,
    ignore_index: int | None = None,
    num_classes: int | None = None,
) -> bool:
    """Whether `mask_labels` would find an object, after the same value check.

    Validation's question, answered from the distinct values alone: the label map (and the
    connected components of `components` and `semantic` masks) is only built for training.
    """
    values = distinct_values(array)
    check_mask_values(array, mask_format, path, num_classes, values)
    if mask_format == "semantic":
        return bool(_kept_classes(values, classes, ignore_index))
    return bool(values.size) and bool(values[-1] > 0)


def mask_labels(
    array: np.ndarray,
    mask_format: str,
    path: str | Path = "<mask>",
    classes: Sequence[int] | None = None,
    ignore_index: int | None = None,
    num_classes: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Interpret a stored mask as a label map of non-overlapping instances.

    Args:
        array: 2-D ids from `read_mask_array`.
        mask_format: one of `MASK_FORMATS`.
        path: named in error messages.
        classes: semantic only: class ids to keep (None keeps every id > 0).
        ignore_index: semantic only: an id treated as background (e.g. 255 in Pascal VOC).
        num_classes: semantic only: ids must be below it.

    Returns:
        (labels int32 [H, W] with 0 background and 1..N the instances, class id of each
        instance: 1 for binary formats, the instance id itself for instance masks).
    """
    values = distinct_values(array)
    check_mask_values(array, mask_format, path, num_classes, values)
    if mask_format == "binary":
        fg = array > 0
        return fg.astype(np.int32), [1] if fg.any() else []
    if mask_format == "components":
        labels, n = _components(array > 0)
        return labels, [1] * n
    if mask_format == "instance":
        ids = values[values > 0]
        if ids.size and ids[-1] == ids.size:  # already 1..N
            return array.astype(np.int32, copy=False), ids.tolist()
        lut = np.zeros(int(ids[-1]) + 1 if ids.size else 1, dtype=np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return lut[array], ids.tolist()
    keep = _kept_classes(values, classes, ignore_index)  # semantic
    labels = np.zeros(array.shape, dtype=np.int32)
    class_ids: list[int] = []
    for c in keep:
        comp, n = _components(array == c)
        labels[comp > 0] = comp[comp > 0] + len(class_ids)
        class_ids.extend([c] * n)
    return labels, class_ids


def labels_to_masks(labels: np.ndarray, count: int | None = None) -> np.ndarray:
    """Label map (0 background, 1..N) -> [N, H, W] bool masks."""
    n = int(labels.max()) if count is None else count
    if n == 0:
        return np.zeros((0, *labels.shape), dtype=bool)
    return labels[None] == np.arange(1, n + 1, dtype=labels.dtype)[:, None, None]


def read_masks(
    path: str | Path,
    mask_format: str,
    classes: Sequence[int] | None = None,
    ignore_index: int | None = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """Read a mask file and return its instances as [N, H, W] bool."""
    labels, class_ids = mask_labels(
        read_mask_array(path), mask_format, path, classes, ignore_index, num_classes
    )
    return labels_to_masks(labels, len(class_ids))
