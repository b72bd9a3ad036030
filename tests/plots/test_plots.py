"""``ssl plot curves|embedding`` and ``ssl neighbors``: the metrics reader, the 2-D maps against independent
computations (SVD, well-separated clusters), class-balanced sampling, neighbours against a brute-force argsort of
the cosine similarities, the grid's pixel geometry and frame colours, and one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import Result
from helpers import invoke as cli_invoke
from helpers import one_json, user_error
from PIL import Image

from conftest import write_image_folder
from ssl_cli.artifacts.backbone import load_backbone
from ssl_cli.artifacts.checkpoint import EXPORT_FORMAT
from ssl_cli.artifacts.safetensors_io import atomic_save
from ssl_cli.augment import eval_transform
from ssl_cli.backbones import build_backbone
from ssl_cli.config.schema import BackboneConfig
from ssl_cli.data import decode_image
from ssl_cli.errors import CheckpointError, DataError
from ssl_cli.plots.curves import panels, read_metrics, read_runs
from ssl_cli.plots.embedding import EMBED_FORMAT, balanced_sample, nn_agreement, project
from ssl_cli.plots.neighbors import (
    CAPTION,
    FRAME,
    HEADER,
    OTHER,
    PAD,
    QUERY,
    QUERY_GAP,
    SAME,
    UNKNOWN,
    nearest,
    render_grid,
    self_mask,
)

SIZE, ZOOM = 32, 3  # 32-pixel images become 96-pixel tiles (MIN_TILE)
TILE = SIZE * ZOOM
EVAL = ["--device", "cpu", "--num-workers", "0"]


def invoke(*args: str | Path) -> Result:
    return cli_invoke(*args, columns=200)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """timm's tiny test ResNet (random weights) as an export, a bank of 4 images x 3 classes, a query folder."""
    root = tmp_path_factory.mktemp("plots")
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="test_resnet"))
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": {"name": "test_resnet", "kwargs": {}},
        "preprocessing": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, SIZE, SIZE]},
    }
    ckpt = root / "backbone.safetensors"
    atomic_save(model.state_dict(), meta, ckpt)
    bank = write_image_folder(root / "bank", per_class=4, classes=3)
    queries = write_image_folder(root / "queries", per_class=2, classes=3, split="test")
    return SimpleNamespace(root=root, ckpt=ckpt, bank=bank, queries=queries)


def _features(ckpt: Path, paths: list[Path]) -> torch.Tensor:
    """Backbone outputs computed here, image by image (not through the package's loader)."""
    model, meta = load_backbone(ckpt, with_meta=True)
    pre = meta["preprocessing"]
    transform = eval_transform(SIZE, pre["mean"], pre["std"])
    with torch.no_grad():
        return torch.cat([model(transform(decode_image(p))[None]) for p in paths])


def _write_metrics(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- training curves --------------------------------------------------------------------------------------


def test_metrics_reader_keeps_the_last_line_of_a_repeated_epoch_and_tolerates_missing_keys(tmp_path: Path) -> None:
    run = tmp_path / "moco"
    _write_metrics(
        run / "metrics.jsonl",
        [
            {"epoch": 1, "step": 10, "loss": 5.0, "lr": 0.1, "seconds": 3.0},
            {"epoch": 2, "step": 20, "loss": 4.0, "lr": 0.2, "contrastive_acc": 0.3},
            {"epoch": 3, "step": 30, "loss": 9.9, "lr": 0.3},  # an interrupted epoch...
            {"epoch": 3, "step": 30, "loss": 3.0, "lr": 0.3, "knn_top1": 0.4, "note": "text"},  # ...redone
            {"epoch": 4, "step": 40, "loss": 2.5, "lr": 0.25, "knn_top1": 0.45, "contrastive_acc": 0.5, "z_std": 0.1},
        ],
    )
    m = read_metrics(run)
    assert m.name == "moco" and m.path == run / "metrics.jsonl"
    assert [r["epoch"] for r in m.records] == [1, 2, 3, 4]
    assert m.series("loss", "epoch") == ([1, 2, 3, 4], [5.0, 4.0, 3.0, 2.5])
    assert m.series("knn_top1", "epoch") == ([3, 4], [0.4, 0.45])  # only where logged
    assert m.series("contrastive_acc", "step") == ([20, 40], [0.3, 0.5])
    assert "note" not in m.keys()  # non-numeric values are not metrics
    got = {p.title: p.keys for p in panels([m])}
    assert got == {
        "loss": ["loss"],
        "learning rate": ["lr"],
        "accuracy": ["contrastive_acc", "knn_top1"],
        "z_std": ["z_std"],
    }
    # the file itself works as well; its name gives the run's name
    flat = _write_metrics(tmp_path / "simclr.metrics.jsonl", [{"epoch": 1, "loss": 1.0}])
    assert read_metrics(flat).name == "simclr"


def test_several_runs_get_distinct_names_and_the_union_of_panels(tmp_path: Path) -> None:
    a = _write_metrics(tmp_path / "a" / "simclr" / "metrics.jsonl", [{"epoch": 1, "loss": 5.0, "lr": 0.1}])
    b = _write_metrics(
        tmp_path / "b" / "simclr" / "metrics.jsonl", [{"epoch": 1, "loss": 6.0, "lr": 0.1, "code_entropy": 7.0}]
    )
    runs = read_runs([a.parent, b])
    assert [r.name for r in runs] == ["a/simclr", "b/simclr"]
    assert [p.title for p in panels(runs)] == ["loss", "learning rate", "code_entropy"]


def test_plot_curves_writes_a_png_of_the_requested_size(tmp_path: Path) -> None:
    one = _write_metrics(
        tmp_path / "one" / "metrics.jsonl", [{"epoch": e, "step": 5 * e, "loss": 6 - e, "lr": 0.1} for e in (1, 2)]
    )
    two = _write_metrics(
        tmp_path / "two" / "metrics.jsonl",
        [{"epoch": e, "loss": 7 - e, "lr": 0.2, "knn_top1": 0.1 * e, "online_top1": 0.05 * e} for e in (1, 2, 3)],
    )
    out = tmp_path / "pictures" / "compare.png"
    result = one_json(
        invoke("plot", "curves", one.parent, two.parent, "--out", out, "--width", 900, "--height", 500, "--json")
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (900, 500)
        im.load()
    assert [p["title"] for p in result["panels"]] == ["loss", "learning rate", "accuracy"]
    assert result["panels"][2]["keys"] == ["knn_top1", "online_top1"]
    assert [r["name"] for r in result["runs"]] == ["one", "two"]
    assert result["runs"][1]["last"]["knn_top1"] == pytest.approx(0.3)
    # the default picture of one run lands in its folder, and no temporary file is left behind
    one_json(invoke("plot", "curves", one.parent, "--json", "--x-axis", "step", "--quiet"))
    assert sorted(p.name for p in one.parent.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_curves_bad_inputs_are_one_line(tmp_path: Path) -> None:
    user_error(invoke("plot", "curves", tmp_path / "missing"), "run not found")
    (tmp_path / "empty").mkdir()
    user_error(invoke("plot", "curves", tmp_path / "empty"), "no metrics.jsonl")
    bad = tmp_path / "bad" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"epoch": 1, "loss": 2.0}\nthis is not json\n', encoding="utf-8")
    user_error(invoke("plot", "curves", bad.parent), "line 2: not JSON")
    with pytest.raises(CheckpointError, match="a JSON list, not an object"):
        read_metrics(_write_metrics(tmp_path / "list.jsonl", [[1, 2]]))  # type: ignore[list-item]
    run = _write_metrics(tmp_path / "ok" / "metrics.jsonl", [{"epoch": 1, "loss": 1.0}])
    user_error(invoke("plot", "curves", run.parent, "--out", tmp_path / "x.jpg"), "must end in .png")
    user_error(invoke("plot", "curves", run.parent, "--x-axis", "time"), "--x-axis time: unknown")
    assert not (run.parent / "curves.png").exists()


# --- class-balanced sampling and the 2-D maps -------------------------------------------------------------


def test_balanced_sample() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 4 + [3] * 16)[
        torch.randperm(100, generator=torch.Generator().manual_seed(1))
    ]
    picked = balanced_sample(labels, 30, seed=0)
    counts = torch.bincount(labels[picked], minlength=4).tolist()
    assert len(picked) == 30 and len(set(picked.tolist())) == 30
    assert counts[2] == 4  # a small class gives all it has...
    assert sorted(counts[i] for i in (0, 1, 3)) in ([8, 9, 9], [9, 9, 8], [8, 9, 9])  # ...the others share the rest
    assert max(counts[i] for i in (0, 1, 3)) - min(counts[i] for i in (0, 1, 3)) <= 1
    assert torch.equal(picked, balanced_sample(labels, 30, seed=0))  # seeded
    assert not torch.equal(picked, balanced_sample(labels, 30, seed=1))
    assert torch.equal(balanced_sample(labels, 500), torch.arange(100))  # more than there are: all
    # fewer images than classes: distinct classes, and not always the first ones
    ten = torch.arange(10).repeat_interleave(5)
    picks = [frozenset(ten[balanced_sample(ten, 3, seed=s)].tolist()) for s in range(8)]
    assert all(len(p) == 3 for p in picks) and len(set(picks)) > 1 and set().union(*picks) - {0, 1, 2}
    unlabeled = balanced_sample(torch.full((20,), -1), 5, seed=0)
    assert len(unlabeled) == 5 and len(set(unlabeled.tolist())) == 5
    with pytest.raises(DataError, match="--num-images 0"):
        balanced_sample(labels, 0)


def test_pca_coordinates_equal_an_independent_svd() -> None:
    g = np.random.default_rng(0)
    x = g.normal(size=(40, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 2.0
    result = project(x, "pca")
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    signs = np.sign((result["points"] * expected).sum(0))
    np.testing.assert_allclose(result["points"] * signs, expected, atol=1e-8)
    np.testing.assert_allclose(result["explained_variance"], (s**2 / (s**2).sum())[:2], rtol=1e-8)


def test_tsne_keeps_well_separated_clusters_apart() -> None:
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 16)) * 20
    labels = np.repeat(np.arange(3), 20)
    x = centres[labels] + g.normal(size=(60, 16))
    result = project(x, "tsne", seed=0)
    points = result["points"]
    assert points.shape == (60, 2) and np.isfinite(points).all()
    assert result["perplexity"] == pytest.approx(59 / 3)  # 30 is too many for 60 points
    # every point's nearest other point in 2-D is of its own cluster (computed here, without the package)
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).all()
    assert nn_agreement(points, labels) == 1.0
    scrambled = np.random.default_rng(1).permutation(labels)
    assert nn_agreement(points, scrambled) < 0.7  # the measure does see mixed labels
    with pytest.raises(DataError, match="--method umap: unknown; valid: tsne, pca"):
        project(x, "umap")


def test_plot_embedding_from_a_checkpoint_and_from_an_embed_file(world, tmp_path: Path) -> None:
    out = tmp_path / "map.png"
    result = one_json(
        invoke(
            "plot",
            "embedding",
            world.ckpt,
            "--data",
            world.bank,
            "--num-images",
            9,
            "--out",
            out,
            "--width",
            640,
            "--height",
            480,
            "--json",
            *EVAL,
        )
    )
    assert result["images"] == 9 and result["per_class"] == {"disc": 3, "square": 3, "triangle": 3}
    with Image.open(out) as im:
        assert im.size == (640, 480)
    pca = one_json(
        invoke("plot", "embedding", world.ckpt, "--data", world.bank, "--method", "pca", "--out", out, "--json", *EVAL)
    )
    assert pca["images"] == 12 and len(pca["explained_variance"]) == 2
    # the 1-NN agreement in feature space is the cosine 1-NN computed here
    paths = sorted(world.bank.rglob("*.png"))
    f = torch.nn.functional.normalize(_features(world.ckpt, paths), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2)
    labels = torch.tensor([["disc", "square", "triangle"].index(p.parent.name) for p in paths])
    assert pca["nn_agreement_features"] == pytest.approx((labels[sim.argmax(1)] == labels).float().mean().item())

    # an ssl embed file (safetensors, format ssl-embeddings/1) is mapped without a backbone
    g = torch.Generator().manual_seed(0)
    emb = torch.cat([torch.randn(10, 8, generator=g) + 10 * torch.eye(8)[c] for c in range(2)])
    meta = {"format": EMBED_FORMAT, "classes": ["cat", "dog"], "paths": [f"{i}.png" for i in range(20)], "data": "x"}
    embed = tmp_path / "embeddings.safetensors"
    atomic_save({"embeddings": emb, "labels": torch.tensor([0] * 10 + [1] * 10)}, meta, embed)
    from_file = one_json(invoke("plot", "embedding", embed, "--method", "pca", "--out", out, "--json"))
    assert from_file["per_class"] == {"cat": 10, "dog": 10} and from_file["nn_agreement_2d"] == 1.0
    user_error(invoke("plot", "embedding", embed, "--data", world.bank, "--out", out), "leave --data out")


def test_embedding_bad_inputs_are_one_line(world, tmp_path: Path) -> None:
    out = tmp_path / "map.png"
    user_error(
        invoke("plot", "embedding", world.ckpt, "--data", world.bank, "--method", "umap", "--out", out),
        "--method umap: unknown; valid: tsne, pca",
    )
    (tmp_path / "empty").mkdir()
    user_error(
        invoke("plot", "embedding", world.ckpt, "--data", tmp_path / "empty", "--out", out, *EVAL), "no images found"
    )
    user_error(
        invoke("plot", "embedding", tmp_path / "nope.safetensors", "--data", world.bank, "--out", out),
        "checkpoint not found",
    )
    user_error(
        invoke("plot", "embedding", world.ckpt, "--data", world.bank, "--out", world.bank / "disc" / "x.png"),
        "inside the image folder",
    )
    user_error(invoke("plot", "embedding", world.ckpt, "--out", out), "--data is needed")
    assert not out.exists()


# --- nearest neighbours and the retrieval grid ------------------------------------------------------------


def test_nearest_equals_a_brute_force_argsort() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 7, generator=g)
    queries = torch.randn(5, 7, generator=g) * 3
    sims, idx = nearest(queries, bank, 4)
    q = queries / queries.norm(dim=1, keepdim=True)
    b = bank / bank.norm(dim=1, keepdim=True)
    full = (q @ b.T).numpy()
    order = np.argsort(-full, axis=1)[:, :4]
    assert (idx.numpy() == order).all()
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(full, order, 1), atol=1e-6)
    # the bank as its own queries: each query's own row is never among its neighbours
    which = torch.tensor([3, 0, 29])
    sims, idx = nearest(bank[which], bank, 5, self_mask(which, len(bank)))
    full = (b[which] @ b.T).numpy()
    full[np.arange(3), which.numpy()] = -np.inf
    assert (idx.numpy() == np.argsort(-full, axis=1)[:, :5]).all()
    assert not (idx == which[:, None]).any()


def _origin(row: int, col: int) -> tuple[int, int]:
    """The grid's documented geometry, spelled out here: frame FRAME, gaps PAD, the query column set apart."""
    box = TILE + 2 * FRAME
    return PAD + col * (box + PAD) + (QUERY_GAP if col else 0), HEADER + row * (box + CAPTION + PAD)


def _colour(im: Image.Image, row: int, col: int) -> tuple[int, int, int]:
    x, y = _origin(row, col)
    return im.getpixel((x + 1, y + 1))[:3]


def test_render_grid_geometry_and_frames() -> None:
    """2 queries x (3 neighbours + the query), solid-colour images: every tile where it belongs, framed by label."""
    solid = [np.full((SIZE, SIZE, 3), v, np.uint8) for v in (10, 60, 110, 160, 210, 250)]
    labels = [[0, 1, -1], [2, 2, 0]]
    im = render_grid(
        [solid[0], solid[1]],
        [[solid[2], solid[3], solid[4]], [solid[5], solid[4], solid[3]]],
        [0, 2],
        labels,
        [[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]],
        ["a", "c"],
        [["a", "b", ""], ["c", "c", "a"]],
        ["header"],
        TILE,
    )
    box = TILE + 2 * FRAME
    assert im.size == (_origin(1, 3)[0] + box + PAD, _origin(1, 3)[1] + box + CAPTION + PAD)
    expected = [[QUERY, SAME, OTHER, UNKNOWN], [QUERY, SAME, SAME, OTHER]]
    inner = [[10, 110, 160, 210], [60, 250, 210, 160]]
    for r in range(2):
        for c in range(4):
            assert _colour(im, r, c) == expected[r][c], (r, c)
            x, y = _origin(r, c)
            assert im.getpixel((x + FRAME + TILE // 2, y + FRAME + TILE // 2)) == (inner[r][c],) * 3
    # along the frames' top edge of each row: exactly 4 framed tiles (runs of non-white pixels)
    for r in range(2):
        y = _origin(r, 0)[1] + 1
        line = np.asarray(im)[y].astype(int)
        framed = (line != 255).any(1)
        assert int((np.diff(framed.astype(int)) == 1).sum()) + int(framed[0]) == 4


def test_neighbors_match_brute_force_and_the_picture_shows_them(world, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = one_json(
        invoke(
            "neighbors", world.ckpt, "--data", world.bank, "--num-queries", 3, "--k", 4, "--out", out, "--json", *EVAL
        )
    )
    paths = sorted(world.bank.rglob("*.png"))
    f = torch.nn.functional.normalize(_features(world.ckpt, paths), dim=1)
    sim = (f @ f.T).numpy()
    assert len(result["queries"]) == 3
    assert sorted(q["class"] for q in result["queries"]) == ["disc", "square", "triangle"]  # class-balanced
    same = total = 0
    with Image.open(out) as im:
        im = im.convert("RGB")
        for r, q in enumerate(result["queries"]):
            i = paths.index(Path(q["path"]))
            row = sim[i].copy()
            row[i] = -np.inf  # the query itself is left out
            order = np.argsort(-row)[:4]
            assert [Path(n["path"]) for n in q["neighbors"]] == [paths[j] for j in order]
            np.testing.assert_allclose([n["similarity"] for n in q["neighbors"]], row[order], atol=1e-5)
            assert _colour(im, r, 0) == QUERY
            for c, n in enumerate(q["neighbors"]):
                match = n["class"] == q["class"]
                same, total = same + match, total + 1
                assert _colour(im, r, c + 1) == (SAME if match else OTHER)
                # the tile shows that image, enlarged ZOOM times by nearest neighbour
                pixels = decode_image(Path(n["path"])).permute(1, 2, 0).numpy()
                x, y = _origin(r, c + 1)
                assert im.getpixel((x + FRAME + 5 * ZOOM + 1, y + FRAME + 7 * ZOOM + 1)) == tuple(pixels[7, 5])
    assert result["precision"] == pytest.approx(same / total)

    # queries from another folder: nothing excluded, the whole bank is searched
    other = one_json(
        invoke(
            "neighbors",
            world.ckpt,
            "--data",
            world.bank,
            "--queries",
            world.queries,
            "--num-queries",
            2,
            "--k",
            12,
            "--out",
            out,
            "--json",
            *EVAL,
        )
    )
    qf = torch.nn.functional.normalize(_features(world.ckpt, [Path(q["path"]) for q in other["queries"]]), dim=1)
    order = np.argsort(-(qf @ f.T).numpy(), axis=1)
    for q, row in zip(other["queries"], order, strict=True):
        assert [Path(n["path"]) for n in q["neighbors"]] == [paths[j] for j in row]


def test_neighbors_bad_inputs_are_one_line(world, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    user_error(
        invoke("neighbors", world.ckpt, "--data", world.bank, "--k", 12, "--out", out, *EVAL), "--k 12: the bank"
    )  # 12 images, one of them the query itself
    (tmp_path / "empty").mkdir()
    user_error(invoke("neighbors", world.ckpt, "--data", tmp_path / "empty", "--out", out, *EVAL), "no images found")
    user_error(
        invoke("neighbors", world.ckpt, "--data", world.bank, "--out", tmp_path / "grid.jpg"), "must end in .png"
    )
    user_error(
        invoke("neighbors", world.ckpt, "--data", world.bank, "--out", world.bank / "grid.png"),
        "inside the image folder",
    )
    user_error(
        invoke("neighbors", world.ckpt, "--data", world.bank, "--num-queries", 0, "--out", out, *EVAL),
        "--num-queries 0",
    )
    assert not out.exists() and not (world.bank / "grid.png").exists()
