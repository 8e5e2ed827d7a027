"""Pixels: every image mode Pillow decodes reaches the model as the image a viewer shows.

Real files of each mode are written with Pillow (16-bit PNG and TIFF, float and 32-bit TIFF, JPEG with
EXIF orientation, multi-frame GIF and TIFF, palettes with transparency, CMYK, LAB, ...), read through the
folder dataset, and the tensor it hands the model is checked against pixels computed here with numpy
from the array that was written. Before the decoding rules, a 16-bit ramp came out nearly white, a float
ramp black, a transparent pixel black and a rotated photo on its side.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.models import tiny_vit
from vitscope.data import SafeImageFolder, SkipCounter, make_loader, open_dataset, stratified_choice, to_rgb
from vitscope.data.datasets import ArrayImageDataset, to_tensor
from vitscope.data.transforms import build_transform, input_normalisation

ORIENTATION = 0x0112
TOLERANCE = 0.5 + 1e-4  # one rounding to 8 bits, in 0..255 units
EXACT = 1e-3  # the same 8-bit value (float32 ÷ 255 only)


def _folder_pixels(path: Path) -> np.ndarray:
    """The [H, W, 3] pixels (0..255 floats) the folder dataset gives the model for the file at ``path``."""
    dataset = SafeImageFolder(path.parent)
    index = [Path(p) for p, _ in dataset.samples].index(path)
    item = dataset[index]
    assert isinstance(item, tuple), f"{path.name} was skipped: {item}"
    return item[0].permute(1, 2, 0).numpy().astype(np.float64) * 255.0


def _memory_pixels(image: Image.Image) -> np.ndarray:
    """The [H, W, 3] pixels (0..255 floats) of an in-memory image decoded by ``to_rgb``."""
    return to_tensor(to_rgb(image)).permute(1, 2, 0).numpy().astype(np.float64) * 255.0


def _grey(values: np.ndarray) -> np.ndarray:
    """A [H, W] array of 0..255 values as the [H, W, 3] grey image it should become."""
    return np.repeat(np.asarray(values, dtype=np.float64)[:, :, None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colours [H, W, 3] with alpha [H, W] (both 0..255) composited over white."""
    a = alpha.astype(np.float64)[:, :, None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    return root


RAMP16 = np.tile(np.linspace(0, 65535, 48).round().astype(np.uint16), (6, 1))  # [6, 48], both extremes


# --- 16-bit, 32-bit and float grey --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "mode"), [("ramp.png", "<u2", "I;16"), ("ramp.tif", "<u2", "I;16"), ("ramp.tif", ">u2", "I;16B")]
)
def test_16_bit_grey_files_are_scaled_by_65535_not_clipped(folder, name, dtype, mode):
    path = folder / name
    Image.fromarray(RAMP16.astype(dtype)).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the file really holds the mode under test
    pixels = _folder_pixels(path)
    expected = _grey(RAMP16 * 255.0 / 65535.0)
    assert np.abs(pixels - expected).max() <= TOLERANCE
    assert pixels.mean() == pytest.approx(127.5, abs=0.5)  # was 251 (clipped at 255): nearly white


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B"])
def test_16_bit_modes_in_memory_are_scaled_by_65535(mode):
    values = RAMP16.astype(">u2" if mode == "I;16B" else "<u2")
    image = Image.frombytes(mode, (RAMP16.shape[1], RAMP16.shape[0]), values.tobytes())
    assert np.abs(_memory_pixels(image) - _grey(RAMP16 * 255.0 / 65535.0)).max() <= TOLERANCE


def test_32_bit_integers_within_16_bits_are_scaled_as_16_bit(folder):
    values = RAMP16.astype(np.int32)
    Image.fromarray(values).save(folder / "i32.tif")
    assert np.abs(_folder_pixels(folder / "i32.tif") - _grey(values * 255.0 / 65535.0)).max() <= TOLERANCE


def test_32_bit_integers_beyond_16_bits_are_stretched_min_to_max(folder):
    values = np.tile(np.linspace(-70000, 900000, 40).round().astype(np.int32), (4, 1))
    Image.fromarray(values).save(folder / "i32.tif")
    with Image.open(folder / "i32.tif") as opened:
        assert opened.mode == "I"
    expected = (values - values.min()) / (values.max() - values.min()) * 255.0
    assert np.abs(_folder_pixels(folder / "i32.tif") - _grey(expected)).max() <= TOLERANCE


def _save_float(folder: Path, values: np.ndarray) -> Path:
    path = folder / "float.tif"
    Image.fromarray(values.astype(np.float32)).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "F"
    return path


def test_float_pixels_within_0_1_are_scaled_by_255(folder):
    values = np.tile(np.linspace(0.0, 1.0, 48), (6, 1))
    pixels = _folder_pixels(_save_float(folder, values))
    assert np.abs(pixels - _grey(values.astype(np.float32) * 255.0)).max() <= TOLERANCE
    assert pixels.mean() == pytest.approx(127.5, abs=0.5)  # was 0.0: all black


def test_float_pixels_beyond_0_1_are_stretched_over_finite_values_nan_black(folder):
    values = np.tile(np.linspace(-3.0, 12.0, 40), (5, 1)).astype(np.float32)
    values[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    finite = values[np.isfinite(values)]
    expected = (values.astype(np.float64) - finite.min()) / (finite.max() - finite.min()) * 255.0
    expected[0, :4] = [0.0, 255.0, 0.0, 0.0]  # NaN black, +inf white, -inf black
    assert np.abs(_folder_pixels(_save_float(folder, values)) - _grey(expected)).max() <= TOLERANCE


@pytest.mark.parametrize(("value", "shown"), [(7.5, 255.0), (-2.0, 0.0), (np.nan, 0.0), (0.25, 63.75)])
def test_float_images_of_one_value_are_clipped(folder, value, shown):
    pixels = _folder_pixels(_save_float(folder, np.full((4, 6), value)))
    assert np.abs(pixels - shown).max() <= TOLERANCE


# --- alpha and palettes ---------------------------------------------------------------------------------

RNG = np.random.default_rng(20)
COLOURS = RNG.integers(0, 256, (8, 12, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (8, 12), dtype=np.uint8)
ALPHA[0, :3] = [0, 255, 128]


def test_rgba_is_composited_over_white(folder):
    Image.fromarray(np.dstack([COLOURS, ALPHA])).save(folder / "rgba.png")
    pixels = _folder_pixels(folder / "rgba.png")
    assert np.abs(pixels - _over_white(COLOURS, ALPHA)).max() <= 1.0
    assert (pixels[0, 0] == 255).all()  # fully transparent: white (was the colour under it)


def test_grey_with_alpha_is_composited_over_white(folder):
    grey = COLOURS[:, :, 0]
    Image.fromarray(np.dstack([grey, ALPHA])).save(folder / "la.png")
    with Image.open(folder / "la.png") as opened:
        assert opened.mode == "LA"
    assert np.abs(_folder_pixels(folder / "la.png") - _over_white(_grey(grey), ALPHA)).max() <= 1.0


def test_premultiplied_and_palette_alpha_modes_in_memory_are_composited_over_white():
    rgba = Image.fromarray(np.dstack([COLOURS, ALPHA]))
    expected = _over_white(COLOURS, ALPHA)
    premultiplied = rgba.convert("RGBa")  # colours stored × alpha; decoded back before compositing
    assert np.abs(_memory_pixels(premultiplied) - expected).max() <= 3.0  # 8-bit premultiplication loses a little
    palette = np.array([[255, 0, 0], [0, 0, 255], [10, 200, 30]], dtype=np.uint8)
    indices = RNG.integers(0, 3, (8, 12), dtype=np.uint8)
    pa = Image.frombytes("PA", (12, 8), np.dstack([indices, ALPHA]).tobytes())
    pa.putpalette(palette.ravel().tolist())
    assert np.abs(_memory_pixels(pa) - _over_white(palette[indices], ALPHA)).max() <= 1.0


PALETTE = np.array([[0, 0, 0], [250, 20, 20], [20, 250, 20], [20, 20, 250]], dtype=np.uint8)
INDICES = np.tile(np.arange(4, dtype=np.uint8).repeat(3), (6, 1))  # [6, 12]: each index three columns wide


def _palette_image() -> Image.Image:
    image = Image.frombytes("P", (12, 6), INDICES.tobytes())
    image.putpalette(PALETTE.ravel().tolist())
    return image


def test_palette_without_transparency_shows_its_colours(folder):
    _palette_image().save(folder / "p.png")
    assert np.abs(_folder_pixels(folder / "p.png") - PALETTE[INDICES]).max() <= EXACT


@pytest.mark.parametrize("name", ["p.png", "p.gif"])
def test_palette_transparent_index_is_white(folder, name):
    _palette_image().save(folder / name, transparency=0)
    expected = PALETTE[INDICES].astype(np.float64)
    expected[INDICES == 0] = 255.0  # index 0 is transparent (its colour, black, was shown before)
    assert np.abs(_folder_pixels(folder / name) - expected).max() <= EXACT


def test_palette_with_alpha_per_entry_is_composited_over_white(folder):
    entry_alpha = np.array([0, 255, 100, 30], dtype=np.uint8)
    _palette_image().save(folder / "p.png", transparency=entry_alpha.tobytes())
    expected = _over_white(PALETTE[INDICES], entry_alpha[INDICES])
    assert np.abs(_folder_pixels(folder / "p.png") - expected).max() <= 1.0


# --- EXIF orientation -------------------------------------------------------------------------------


def _upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for ``stored`` [H, W, ...] tagged with an EXIF orientation (EXIF 2.3, tag 274)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180°
        4: lambda a: a[::-1, :],  # mirrored top-bottom
        5: lambda a: a.swapaxes(0, 1),  # mirrored about the main diagonal
        6: lambda a: np.rot90(a, k=-1),  # rotated 90° clockwise
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # mirrored about the anti-diagonal
        8: lambda a: np.rot90(a, k=1),  # rotated 90° counter-clockwise
    }[orientation](stored)


def _with_orientation(image: Image.Image, orientation: int) -> Image.Exif:
    exif = image.getexif()
    exif[ORIENTATION] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_png(folder, orientation):
    stored = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # not square: rotations change the shape
    image = Image.fromarray(stored)
    image.save(folder / "photo.png", exif=_with_orientation(image, orientation))
    assert np.abs(_folder_pixels(folder / "photo.png") - _upright(stored, orientation)).max() <= EXACT


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_jpeg(folder, orientation):
    levels = np.array([[10, 60, 110], [160, 210, 250]], dtype=np.uint8)
    stored = levels.repeat(8, axis=0).repeat(8, axis=1)  # [16, 24] grey, flat 8 × 8 JPEG blocks: near-lossless
    image = Image.fromarray(stored)
    image.save(folder / "photo.jpg", quality=95, exif=_with_orientation(image, orientation))
    assert np.abs(_folder_pixels(folder / "photo.jpg") - _grey(_upright(stored, orientation))).max() <= 2.0


# --- frames, colour spaces, bilevel and grey -----------------------------------------------------------


@pytest.mark.parametrize("name", ["frames.gif", "frames.tif"])
def test_multi_frame_files_give_their_first_frame(folder, name):
    frames = [Image.fromarray(np.full((5, 7, 3), colour, dtype=np.uint8)) for colour in ([200, 30, 30], [30, 200, 30])]
    if name.endswith(".gif"):
        frames = [frame.quantize(colors=2) for frame in frames]
    frames[0].save(folder / name, save_all=True, append_images=frames[1:])
    with Image.open(folder / name) as opened:
        assert opened.n_frames == 2
    assert np.abs(_folder_pixels(folder / name) - np.array([200, 30, 30])).max() <= 1.0


@pytest.mark.parametrize(("name", "tolerance"), [("cmyk.tif", 0.5 + 1e-4), ("cmyk.jpg", 3.0)])
def test_cmyk_inks_become_their_rgb(folder, name, tolerance):
    inks = np.array([[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 255, 0], [40, 80, 120, 100]], dtype=np.uint8)
    stored = inks.repeat(8, axis=0)[None].repeat(8, axis=0).reshape(8, 32, 4)  # [8, 32] in four 8-px stripes
    Image.frombytes("CMYK", (32, 8), stored.tobytes()).save(folder / name, quality=100)
    with Image.open(folder / name) as opened:
        assert opened.mode == "CMYK"
    ink = stored.astype(np.float64) / 255.0
    expected = 255.0 * (1.0 - ink[:, :, :3]) * (1.0 - ink[:, :, 3:])  # no ICC profile: the naive conversion
    assert np.abs(_folder_pixels(folder / name) - expected).max() <= tolerance


def test_lab_pixels_become_srgb(folder):
    lightness = np.array([0.0, 25.0, 50.0, 75.0, 100.0, 54.29])
    a_b = np.array([[0, 0]] * 5 + [[80.81, 69.89]])  # the last: sRGB red in CIELAB (D50)
    stored = np.column_stack([np.round(lightness * 2.55), np.round(a_b).astype(np.int8).view(np.uint8)])
    stored = stored.astype(np.uint8)[None].repeat(3, axis=0)  # [3, 6, 3]: Pillow keeps a, b as signed bytes
    Image.frombytes("LAB", (6, 3), stored.tobytes()).save(folder / "lab.tif")
    pixels = _folder_pixels(folder / "lab.tif")
    y = np.where(lightness > 8.0, ((np.round(lightness * 2.55) / 2.55 + 16.0) / 116.0) ** 3, lightness / 903.3)
    grey = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055) * 255.0  # sRGB transfer
    assert np.abs(pixels[:, :5] - _grey(np.tile(grey[:5], (3, 1)))).max() <= 2.0
    assert np.abs(pixels[:, 5] - np.array([255.0, 0.0, 0.0])).max() <= 8.0


def test_hsv_and_ycbcr_in_memory_become_rgb():
    hsv = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    expected = np.array([[colorsys.hsv_to_rgb(*(p / 255.0)) for p in row] for row in hsv]) * 255.0
    assert np.abs(_memory_pixels(Image.frombytes("HSV", (5, 4), hsv.tobytes())) - expected).max() <= 1.0
    ycc = RNG.integers(16, 240, (4, 5, 3), dtype=np.uint8).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0  # JFIF full-range YCbCr
    expected = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    image = Image.frombytes("YCbCr", (5, 4), ycc.astype(np.uint8).tobytes())
    assert np.abs(_memory_pixels(image) - np.clip(expected, 0, 255)).max() <= 1.5


def test_bilevel_grey_and_rgb_files_keep_their_pixels(folder):
    bits = RNG.integers(0, 2, (6, 16)).astype(bool)
    Image.fromarray(bits).save(folder / "bits.png")
    with Image.open(folder / "bits.png") as opened:
        assert opened.mode == "1"
    assert np.abs(_folder_pixels(folder / "bits.png") - _grey(bits * 255.0)).max() <= EXACT
    Image.fromarray(COLOURS[:, :, 1]).save(folder / "grey.png")
    assert np.abs(_folder_pixels(folder / "grey.png") - _grey(COLOURS[:, :, 1])).max() <= EXACT
    Image.fromarray(COLOURS).save(folder / "rgb.png")
    assert np.abs(_folder_pixels(folder / "rgb.png") - COLOURS).max() <= EXACT


def test_array_dataset_of_16_bit_images_is_scaled_by_65535():
    images = np.stack([RAMP16, RAMP16[:, ::-1]])
    sample, label = ArrayImageDataset(images, np.array([3, 4]))[1]
    expected = _grey(RAMP16[:, ::-1] * 255.0 / 65535.0)
    assert label == 4 and np.abs(sample.permute(1, 2, 0).numpy() * 255.0 - expected).max() <= TOLERANCE


def test_hugging_face_transform_decodes_16_bit_images():
    transformers = pytest.importorskip("transformers")
    from vitscope.models.hf import HFImageTransform

    processor = transformers.ViTImageProcessor(do_resize=False, do_normalize=False)  # pixels / 255 only
    tensor = HFImageTransform(processor)(Image.fromarray(RAMP16))
    expected = _grey(RAMP16 * 255.0 / 65535.0).transpose(2, 0, 1) / 255.0
    assert np.abs(tensor.numpy() - expected).max() <= TOLERANCE / 255.0


# --- the real dataset path: class folders, the model's transform, the loader, corrupt files ----------


def _ramp16_file(path: Path, flip: bool = False) -> np.ndarray:
    """Write a 32 × 32 16-bit grey ramp PNG; return the 0..255 grey image a viewer shows [32, 32, 3]."""
    values = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    values = values[:, ::-1] if flip else values
    Image.fromarray(np.ascontiguousarray(values)).save(path)
    return _grey(values * 255.0 / 65535.0)


def test_folder_dataset_hands_the_model_viewer_pixels_through_its_transform(folder):
    model = tiny_vit()  # 32 px input: the 32 px files pass its eval transform without resampling
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    expected = {"a/ramp16.png": _ramp16_file(folder / "a" / "ramp16.png")}
    floats = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32)[:, None], (1, 32))
    Image.fromarray(floats).save(folder / "a" / "float.tif")
    expected["a/float.tif"] = _grey(floats * 255.0)
    stored = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    image.save(folder / "b" / "rotated.png", exif=_with_orientation(image, 6))
    expected["b/rotated.png"] = _upright(stored, 6).astype(np.float64)
    rgba = np.dstack([stored, RNG.integers(0, 256, (32, 32), dtype=np.uint8)])
    Image.fromarray(rgba).save(folder / "b" / "rgba.png")
    expected["b/rgba.png"] = _over_white(stored, rgba[:, :, 3])

    dataset = open_dataset(f"folder:{folder}", "test", build_transform(model))
    batches = list(make_loader(dataset, batch_size=4))
    assert len(batches) == 1 and not batches[0].skipped and batches[0].labels.tolist() == [0, 0, 1, 1]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in input_normalisation(model))
    names = ["/".join(Path(p).parts[-2:]) for p, _ in dataset.samples]
    for name, tensor in zip(names, batches[0].images):
        want = (torch.from_numpy(expected[name]).permute(2, 0, 1).float() / 255.0 - mean) / std
        assert (tensor - want).abs().max() <= 1.0 / 255.0 / std.min(), name
    with torch.no_grad():
        assert torch.isfinite(model(batches[0].images)).all()


def test_corrupt_16_bit_png_is_skipped_named_counted_and_replaced_by_its_class(folder):
    expected = {}
    for cls in ("a", "b"):
        (folder / cls).mkdir()
        for i in range(3):
            expected[f"{cls}/{i}.png"] = _ramp16_file(folder / cls / f"{i}.png", flip=bool(i % 2))
    dataset = SafeImageFolder(folder)
    chosen = stratified_choice(dataset.labels, 2, seed=0).indices  # one image of each class
    broken = Path(dataset.samples[int(chosen[0])][0])
    broken.write_bytes(broken.read_bytes()[:80])  # a truncated 16-bit PNG

    counter = SkipCounter()
    batches = list(make_loader(SafeImageFolder(folder), num_images=2, batch_size=2, seed=0))
    for batch in batches:
        counter.update(batch)
    images = torch.cat([batch.images for batch in batches])
    assert len(images) == 2, "the truncated image must be replaced, not dropped"
    assert counter.count == 1 and counter.skipped[0][0] == str(broken)
    assert "replaced by another image of its class" in counter.skipped[0][1]
    assert str(broken) in counter.report()
    readable = [name for name in expected if name != "/".join(broken.parts[-2:])]
    for tensor in images:  # every image that reached the model is one of the readable ramps, decoded right
        pixels = tensor.permute(1, 2, 0).numpy() * 255.0
        assert min(np.abs(pixels - expected[name]).max() for name in readable) <= TOLERANCE
