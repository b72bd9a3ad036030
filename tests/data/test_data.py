"""Data sources, image decoding, in-memory caching, the demo set and reproducible loading."""

from __future__ import annotations

import random
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import ssl_cli.data.images as images_mod
from ssl_cli.data import ImageSet, decode_image, open_dataset, scan_folder
from ssl_cli.data.demo import CLASSES, SPLIT_SIZES, make_demo
from ssl_cli.data.loader import EpochSampler, ViewDataset, resolve_workers, train_loader
from ssl_cli.errors import DataError


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path, **kwargs)
    return path


def _rgb(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Folder layouts
# ---------------------------------------------------------------------------------------------------------


def test_image_folder_fixture_layout(image_folder: Path):
    ds = open_dataset(str(image_folder))
    assert ds.classes == sorted(CLASSES[:3])
    assert len(ds) == 24 and ds.labeled
    assert torch.bincount(ds.labels).tolist() == [8, 8, 8]
    assert ds.paths is not None
    for path, label in zip(ds.paths, ds.labels.tolist(), strict=True):
        assert path.parent.name == ds.classes[label]


def test_image_folder_sorted_classes_and_recursive(tmp_path: Path):
    root = tmp_path / "data"
    # created in unsorted order; images at several depths below each class folder
    files = {
        "zebra": ["a.png", "sub/b.png", "sub/deeper/c.jpg"],
        "apple": ["x.PNG"],
        "mango": ["deep/er/y.bmp", "z.png"],
    }
    for i, (cls, names) in enumerate(files.items()):
        for j, name in enumerate(names):
            _save(root / cls / name, _rgb(10 * i + j))
    # not images / hidden: ignored
    (root / "zebra" / "notes.txt").write_text("not an image")
    _save(root / "apple" / ".hidden.png", _rgb(99))
    (root / ".cache").mkdir()
    _save(root / ".cache" / "thumb.png", _rgb(98))

    ds = scan_folder(root)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert ds.labeled
    assert len(ds) == 6
    got = {(p.relative_to(root).as_posix(), int(lbl)) for p, lbl in zip(ds.paths, ds.labels, strict=True)}
    expected = {(f"{cls}/{name}", ds.classes.index(cls)) for cls, names in files.items() for name in names}
    assert got == expected
    assert ds.labels.dtype == torch.int64


def test_unlabeled_folder_tree(tmp_path: Path):
    root = tmp_path / "photos"
    _save(root / "top.png", _rgb(1))
    _save(root / "trip" / "one.jpg", _rgb(2))
    _save(root / "trip" / "day2" / "two.png", _rgb(3))
    ds = open_dataset(str(root))
    assert len(ds) == 3
    assert ds.labels.tolist() == [-1, -1, -1]
    assert not ds.labeled
    assert ds.classes == []
    assert sorted(p.name for p in ds.paths) == ["one.jpg", "top.png", "two.png"]


def test_empty_folder_is_data_error(tmp_path: Path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as e:
        open_dataset(str(root))
    msg = str(e.value)
    assert str(root) in msg and ".jpg" in msg and ".png" in msg
    # only non-images, in class folders too
    (root / "cls").mkdir()
    (root / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        scan_folder(root)


def test_missing_path_is_data_error(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        open_dataset(str(missing))
    msg = str(e.value)
    assert str(missing) in msg
    for name in ("demo", "cifar10", "cifar100", "stl10"):
        assert name in msg
    with pytest.raises(DataError, match="nope"):
        scan_folder(missing)


def test_unknown_dataset_name_is_data_error():
    with pytest.raises(DataError) as e:
        open_dataset("imagenet42")
    msg = str(e.value)
    assert "imagenet42" in msg and "demo" in msg and "cifar10" in msg and "stl10" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------------------
# Decoding to RGB
# ---------------------------------------------------------------------------------------------------------


def _check_rgb(t: torch.Tensor, h: int, w: int) -> None:
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, h, w) and t.is_contiguous()


def test_decode_rgb_png_exact(tmp_path: Path):
    a = _rgb(0, 5, 7)
    t = decode_image(_save(tmp_path / "x.png", a))
    _check_rgb(t, 5, 7)
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1))


def test_decode_grey(tmp_path: Path):
    g = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4) * 10
    t = decode_image(_save(tmp_path / "g.png", g, "L"))
    _check_rgb(t, 6, 4)
    for c in range(3):
        assert torch.equal(t[c], torch.from_numpy(g))


def test_decode_grey_alpha(tmp_path: Path):
    la = np.stack([np.full((3, 3), 77, np.uint8), np.zeros((3, 3), np.uint8)], -1)
    t = decode_image(_save(tmp_path / "la.png", la, "LA"))
    _check_rgb(t, 3, 3)
    assert (t == 77).all()


def test_decode_rgba_drops_alpha(tmp_path: Path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 10, 20, 30
    a[..., 3] = np.arange(16).reshape(4, 4) * 16  # varying alpha, including fully transparent
    t = decode_image(_save(tmp_path / "a.png", a, "RGBA"))
    _check_rgb(t, 4, 4)
    assert t[:, 0, 0].tolist() == [10, 20, 30]
    assert (t == torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)).all()


@pytest.mark.parametrize("transparency", [False, True])
def test_decode_palette(tmp_path: Path, transparency: bool):
    im = Image.new("P", (4, 3))
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (768 - 9))
    im.putpixel((1, 1), 1)
    im.putpixel((3, 2), 2)
    path = tmp_path / "p.png"
    im.save(path, **({"transparency": 0} if transparency else {}))
    with Image.open(path) as check:
        assert check.mode == "P" and (("transparency" in check.info) == transparency)
    t = decode_image(path)
    _check_rgb(t, 3, 4)
    assert t[:, 0, 0].tolist() == [10, 20, 30]  # the transparent colour keeps its palette RGB
    assert t[:, 1, 1].tolist() == [200, 100, 50]
    assert t[:, 2, 3].tolist() == [0, 255, 0]


def test_decode_bilevel(tmp_path: Path):
    b = np.zeros((4, 4), bool)
    b[0, :] = True
    t = decode_image(_save(tmp_path / "b.png", b))
    _check_rgb(t, 4, 4)
    assert (t[:, 0] == 255).all() and (t[:, 1:] == 0).all()


def test_decode_16bit_png_scales_to_8bit(tmp_path: Path):
    values = np.array([[0, 257, 257 * 100, 257 * 200], [65535, 32896, 128, 65280]], dtype=np.uint16)
    path = _save(tmp_path / "deep.png", values)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    t = decode_image(path)
    _check_rgb(t, 2, 4)
    expected = np.round(values / 257.0).astype(np.uint8)
    for c in range(3):
        assert t[c].tolist() == expected.tolist()


def test_decode_32bit_int_tiff(tmp_path: Path):
    values = np.array([[0, 257 * 10], [257 * 128, 65535]], dtype=np.int32)
    try:
        path = _save(tmp_path / "int.tif", values, "I")
    except OSError:
        pytest.skip("PIL cannot write mode I TIFF")
    t = decode_image(path)
    _check_rgb(t, 2, 2)
    assert t[0].tolist() == [[0, 10], [128, 255]]
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_decode_32bit_int_tiff_beyond_16_bits_scales_by_the_int32_range(tmp_path: Path):
    """A genuine 32-bit integer TIFF (values above 65535) saturated at 255 before."""
    top = 2**31 - 1
    values = np.array([[0, top // 4], [top // 2, top]], dtype=np.int32)
    t = decode_image(_save(tmp_path / "int32.tif", values, "I"))
    assert t[0].tolist() == [[0, 64], [127, 255]]  # round(v / (2^31 - 1) x 255)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[0.0, 0.25], [0.5, 1.0]], [[0, 64], [128, 255]]),  # [0, 1]: the usual float image
        ([[0.0, 10.0], [128.0, 255.0]], [[0, 10], [128, 255]]),  # already 0..255
        ([[0.0, 250.0], [500.0, 1000.0]], [[0, 64], [128, 255]]),  # a larger range: by its maximum
    ],
)
def test_decode_float_tiff(tmp_path: Path, values, expected):
    """Float TIFFs (mode F) became black (PIL's convert clips [0, 1] floats to 0 / 1)."""
    path = _save(tmp_path / "f.tif", np.array(values, dtype=np.float32), "F")
    with Image.open(path) as check:
        assert check.mode == "F"
    t = decode_image(path)
    _check_rgb(t, 2, 2)
    assert t[0].tolist() == expected and torch.equal(t[0], t[2])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_decode_turns_the_image_as_its_exif_orientation_says(tmp_path: Path, orientation: int):
    """A phone photo is stored sideways with an EXIF orientation tag; viewers (and now ssl) turn it upright:
    3 = rotated 180 degrees, 6 = turn 90 degrees clockwise to view, 8 = 90 degrees counter-clockwise."""
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"  # PNG: lossless, with an eXIf chunk
    Image.fromarray(stored, "RGB").save(path, exif=exif)
    t = decode_image(path).permute(1, 2, 0).numpy()
    upright = {3: np.rot90(stored, 2), 6: np.rot90(stored, -1), 8: np.rot90(stored, 1)}[orientation]
    assert t.shape == upright.shape and (t == upright).all()


def test_decode_cmyk_jpeg(tmp_path: Path):
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[:, :4, 0] = 255  # cyan on the left, white (no ink) on the right
    path = _save(tmp_path / "c.jpg", cmyk, "CMYK", quality=100)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    t = decode_image(path)
    _check_rgb(t, 8, 8)
    left, right = t[:, :, :2].float().mean((1, 2)), t[:, :, -2:].float().mean((1, 2))
    assert left[0] < 30 and left[1] > 225 and left[2] > 225
    assert (right > 225).all()


def _corrupt_files(tmp_path: Path) -> list[Path]:
    good = _save(tmp_path / "good.png", _rgb(3, 16, 16)).read_bytes()
    gif = _save(tmp_path / "good.gif", _rgb(4, 16, 16)[..., 0], "L").read_bytes()
    out = []
    for name, data in [
        ("truncated.png", good[: len(good) // 2]),
        ("garbage.jpg", b"definitely not an image" * 10),
        ("empty.png", b""),
        ("bitflip.png", good[:60] + bytes([good[60] ^ 0xFF]) + good[61:]),
        # header claims a 65535 x 65535 image: PIL refuses it as a decompression bomb
        ("huge.gif", gif[:6] + b"\xff\xff\xff\xff" + gif[10:]),
    ]:
        p = tmp_path / "bad" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        out.append(p)
    return out


def test_corrupt_files_are_data_errors(tmp_path: Path):
    for path in _corrupt_files(tmp_path):
        with pytest.raises(DataError) as e:
            decode_image(path)
        assert str(path) in str(e.value), path.name


def test_a_bad_image_decoded_in_a_loader_worker_is_its_own_one_line(image_folder: Path) -> None:
    """torch re-raises a worker's error with the worker's whole traceback as its message (the user saw it folded into
    one long line): only what is wrong with which file is left."""
    bad = image_folder / CLASSES[0] / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    ds = scan_folder(image_folder)
    loader = train_loader(ViewDataset(ds, lambda image: [image.float()], seed=0), len(ds), num_workers=1, seed=0)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith(f"cannot decode image {bad}: ") and "\n" not in message, message
    assert "Traceback" not in message and "worker" not in message, message


def test_corrupt_file_in_folder_named_on_load_and_cache(image_folder: Path):
    bad = image_folder / CLASSES[0] / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    ds = scan_folder(image_folder)
    index = ds.paths.index(bad)
    with pytest.raises(DataError, match="zz_broken.png"):
        ds.load(index)
    with pytest.raises(DataError, match="zz_broken.png"):
        ds.cached("memory")


# ---------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------


def test_cached_memory_decodes_once_into_tensor(image_folder: Path, monkeypatch: pytest.MonkeyPatch):
    ds = scan_folder(image_folder)
    direct = [decode_image(p) for p in ds.paths]

    calls: list[Path] = []
    real = images_mod.decode_image

    def counting(path: Path) -> torch.Tensor:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(images_mod, "decode_image", counting)
    mem = ds.cached("memory")
    assert sorted(calls) == sorted(ds.paths)  # each file decoded exactly once
    assert isinstance(mem.images, torch.Tensor)
    assert mem.images.dtype == torch.uint8 and tuple(mem.images.shape) == (24, 3, 32, 32)
    assert torch.equal(mem.labels, ds.labels) and mem.classes == ds.classes and len(mem) == 24
    for i in range(len(mem)):
        assert torch.equal(mem.load(i), direct[i])
        assert torch.equal(mem.images[i], direct[i])
    assert len(calls) == 24  # loading from memory decodes nothing
    assert mem.cached("memory") is mem  # already decoded: nothing to do


def test_cached_memory_mixed_sizes_is_list(tmp_path: Path):
    root = tmp_path / "mixed"
    arrays = {"a/0.png": _rgb(1, 8, 8), "a/1.png": _rgb(2, 12, 6), "b/0.png": _rgb(3, 5, 9)}
    for name, a in arrays.items():
        _save(root / name, a)
    mem = scan_folder(root).cached("memory")
    assert isinstance(mem.images, list) and len(mem.images) == 3
    for i, a in enumerate(arrays.values()):
        assert torch.equal(mem.load(i), torch.from_numpy(a).permute(2, 0, 1))


def test_cached_none_keeps_paths(image_folder: Path):
    ds = scan_folder(image_folder)
    lazy = ds.cached("none")
    assert lazy.images is None and lazy.paths == ds.paths
    auto = ds.cached("auto")  # tiny set: decoded
    assert isinstance(auto.images, torch.Tensor)
    for i in (0, 7, 23):
        assert torch.equal(lazy.load(i), decode_image(ds.paths[i]))
        assert torch.equal(lazy.load(i), auto.load(i))


def test_subset_keeps_pixels_and_labels(image_folder: Path):
    ds = scan_folder(image_folder)
    idx = torch.tensor([23, 0, 9])
    for source in (ds, ds.cached("memory")):
        sub = source.subset(idx)
        assert sub.labels.tolist() == ds.labels[idx].tolist()
        for j, i in enumerate(idx.tolist()):
            assert torch.equal(sub.load(j), ds.load(i))


# ---------------------------------------------------------------------------------------------------------
# Demo set
# ---------------------------------------------------------------------------------------------------------


def test_demo_deterministic_balanced():
    a_img, a_lbl = make_demo("train", num_images=200)
    b_img, b_lbl = make_demo("train", num_images=200)
    assert torch.equal(a_img, b_img) and torch.equal(a_lbl, b_lbl)
    assert a_img.dtype == torch.uint8 and tuple(a_img.shape) == (200, 3, 32, 32)
    assert a_lbl.dtype == torch.int64
    assert torch.bincount(a_lbl, minlength=len(CLASSES)).tolist() == [20] * len(CLASSES)
    assert a_img.float().std() > 20  # not blank
    test_img, _ = make_demo("test", num_images=200)
    assert not torch.equal(a_img, test_img)  # the split picks the seed, not only the count
    small, _ = make_demo("test", size=16, num_images=30)
    assert tuple(small.shape) == (30, 3, 16, 16)


def test_open_dataset_demo_splits():
    train = open_dataset(None)
    again = open_dataset("demo")
    test = open_dataset("demo:test")
    assert train.name == "demo:train" and test.name == "demo:test"
    assert open_dataset(None, role="eval").name == "demo:test"
    assert open_dataset("demo", role="eval").name == "demo:test"
    assert len(train) == SPLIT_SIZES["train"] and len(test) == SPLIT_SIZES["test"]
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    for ds in (train, test):
        assert ds.labeled and ds.classes == list(CLASSES)
        assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape[1:]) == (3, 32, 32)
        counts = torch.bincount(ds.labels, minlength=len(CLASSES))
        assert (counts == len(ds) // len(CLASSES)).all()
    # the splits are different images: no test image appears in train
    train_keys = {bytes(x) for x in train.images.flatten(1).numpy()}
    assert not any(bytes(x) in train_keys for x in test.images.flatten(1).numpy())


def test_bad_demo_split():
    with pytest.raises(DataError) as e:
        open_dataset("demo:validation")
    assert "validation" in str(e.value) and "train" in str(e.value) and "test" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# torchvision names, offline
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "attr", "error"),
    [
        ("cifar10", "CIFAR10", urllib.error.URLError("[Errno -3] Temporary failure in name resolution")),
        ("cifar100:test", "CIFAR100", OSError("Network is unreachable\nsecond line of detail")),
        ("stl10", "STL10", RuntimeError("Dataset not found or corrupted.\nYou can use download=True")),
    ],
)
def test_torchvision_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec, attr, error):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SSL_DATA_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no folder named like the dataset in the working directory
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise error

    monkeypatch.setattr(torchvision.datasets, attr, offline)
    with pytest.raises(DataError) as e:
        open_dataset(spec)
    assert calls, "the torchvision dataset class was not used"
    assert str(cache) in str(calls[0][0][0])
    msg = str(e.value)
    assert "\n" not in msg
    assert spec.split(":")[0] in msg and str(cache) in msg
    assert "--data" in msg and "folder" in msg


def test_torchvision_split_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SSL_DATA_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    seen = []

    class FakeCifar:
        def __init__(self, root, train, download):
            seen.append(train)
            self.data = np.zeros((4, 32, 32, 3), np.uint8)
            self.targets = [0, 1, 2, 1]
            self.classes = ["a", "b", "c"]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    train = open_dataset("cifar10")
    test = open_dataset("cifar10", role="eval")
    explicit = open_dataset("cifar10:test")
    assert seen == [True, False, False]
    assert train.name == "cifar10:train" and test.name == "cifar10:test" and explicit.name == "cifar10:test"
    assert tuple(train.images.shape) == (4, 3, 32, 32) and train.labels.tolist() == [0, 1, 2, 1]
    assert train.classes == ["a", "b", "c"]


@pytest.mark.parametrize(("spec", "valid"), [("cifar10:val", ["train", "test"]), ("stl10:extra", ["unlabeled"])])
def test_torchvision_bad_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec, valid):
    monkeypatch.chdir(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("must not try to download for a bad split")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", never)
    monkeypatch.setattr(torchvision.datasets, "STL10", never)
    with pytest.raises(DataError) as e:
        open_dataset(spec)
    msg = str(e.value)
    assert spec.split(":")[1] in msg
    for v in valid:
        assert v in msg


# ---------------------------------------------------------------------------------------------------------
# Reproducible loading
# ---------------------------------------------------------------------------------------------------------


def _views(image: torch.Tensor) -> list[torch.Tensor]:
    """A small random augmentation using torch's global RNG (as torchvision's transforms do)."""
    noise = torch.rand(2, *image.shape)
    flip = torch.rand(()) < 0.5
    x = image.float() / 255
    x = x.flip(-1) if flip else x
    return [x + noise[0], x * noise[1]]


@pytest.fixture
def small_set() -> ImageSet:
    images, labels = make_demo("test", size=8, num_images=10)
    return ImageSet("tiny", labels, list(CLASSES), images=images)


def _scramble_global_rngs() -> None:
    torch.rand(7)
    random.random()
    np.random.rand(3)


def test_views_pure_function_of_seed_epoch_index(small_set: ImageSet):
    n = len(small_set)
    a = ViewDataset(small_set, _views, seed=3)
    first = {g: a[g] for g in (0, 5, n + 5, 2 * n + 9)}
    _scramble_global_rngs()
    b = ViewDataset(small_set, _views, seed=3)
    for g in reversed(list(first)):
        views, label, index = b[g]
        assert index == g % n and label == int(small_set.labels[g % n])
        assert all(torch.equal(x, y) for x, y in zip(views, first[g][0], strict=True))
        _scramble_global_rngs()
    # another epoch of the same image, another seed: different views
    assert not torch.equal(first[5][0][0], first[n + 5][0][0])
    c = ViewDataset(small_set, _views, seed=4)
    assert not torch.equal(c[5][0][0], first[5][0][0])
    # different images in the same epoch get different noise
    assert not torch.equal(a[0][0][0] - small_set.images[0] / 255, a[1][0][0] - small_set.images[1] / 255)


def test_getitem_leaves_global_rng_alone(small_set: ImageSet):
    ds = ViewDataset(small_set, _views, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ds[4]
    ds[17]
    assert torch.equal(torch.get_rng_state(), state)
    expected = torch.rand(5, generator=torch.Generator().manual_seed(123))
    assert torch.equal(torch.rand(5), expected)


def test_epoch_sampler_permutations():
    n = 13
    s = EpochSampler(n, seed=7)
    assert len(s) == n
    epochs = []
    for epoch in range(3):
        s.set_epoch(epoch)
        ids = list(s)
        assert sorted(ids) == list(range(epoch * n, (epoch + 1) * n))
        assert list(s) == ids  # same (seed, epoch): same order
        epochs.append([i - epoch * n for i in ids])
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))  # shuffled
    other = EpochSampler(n, seed=8)
    assert [i for i in other] != epochs[0]
    again = EpochSampler(n, seed=7)
    again.set_epoch(1)
    assert [i - n for i in again] == epochs[1]


def _collect(loader, epoch: int) -> tuple[list[int], dict[int, list[torch.Tensor]]]:
    loader.sampler.set_epoch(epoch)
    order, out = [], {}
    for views, _labels, index in loader:
        for j, i in enumerate(index.tolist()):
            order.append(i)
            out[i] = [v[j] for v in views]
    return order, out


def test_loader_same_views_with_and_without_workers(small_set: ImageSet):
    results = []
    for workers in (0, 1):
        ds = ViewDataset(small_set, _views, seed=11)
        loader = train_loader(ds, batch_size=5, num_workers=workers, seed=11)
        results.append([_collect(loader, epoch) for epoch in (0, 1)])
        _scramble_global_rngs()
    (order0, views0), (order1, views1) = results[0]
    assert results[0][0][0] == results[1][0][0] and results[0][1][0] == results[1][1][0]  # same order
    assert sorted(order0) == list(range(len(small_set))) and order0 != order1
    for epoch in (0, 1):
        a, b = results[0][epoch][1], results[1][epoch][1]
        assert a.keys() == b.keys()
        for i in a:
            assert all(torch.equal(x, y) for x, y in zip(a[i], b[i], strict=True))
    # the same image differs between epochs
    assert not torch.equal(views0[0][0], views1[0][0])


def test_auto_workers_from_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch):
    import ssl_cli.data.loader as loader_mod

    monkeypatch.setattr(loader_mod.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert loader_mod.available_cores() == 3  # the affinity mask (a container's share), not every core
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, workers in [(1, 1), (2, 1), (4, 3), (16, 8)]:  # one core left to the step, 1 to 8 workers
        monkeypatch.setattr(loader_mod, "available_cores", lambda cores=cores: cores)
        assert resolve_workers("auto") == workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this machine share its 16 cores
    assert resolve_workers("auto") == 3 and resolve_workers(5) == 5
