"""A 2-D map of backbone features: t-SNE (or PCA) of a class-balanced sample, a scatter coloured by label.

t-SNE [0] follows the standard recipe: the L2-normalised features (the cosine geometry ``ssl knn`` uses) are
reduced to 50 dimensions by PCA first, then embedded by scikit-learn's Barnes-Hut ``TSNE`` (PCA initialisation,
learning rate ``max(N / early_exaggeration / 4, 50)``, the "auto" rule of [1]). t-SNE keeps neighbourhoods,
not distances: cluster sizes and the gaps between clusters carry little meaning. ``pca`` shows the two
directions of largest variance instead, a linear and faithful but usually less separated view.

Instead of a checkpoint, the map takes a file of ``ssl embed`` (``.safetensors`` with tensors ``embeddings``
and ``labels``, or ``.npy`` with its ``.json``; format ``ssl-embeddings/1``): its features are used as they are.

Two figures summarise the picture: the share of images whose nearest neighbour has the same label in the
feature space (cosine) and in the 2-D map (Euclidean). The first is a 1-NN classifier's leave-one-out
accuracy on the sample; the second says how much of it the map kept.

[0] Visualizing Data using t-SNE, van der Maaten & Hinton, JMLR 2008.
[1] The art of using t-SNE for single-cell transcriptomics, Kobak & Berens, Nat. Commun. 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_cli.errors import CheckpointError, DataError
from ssl_cli.plots.files import write_atomic

METHODS = ("tsne", "pca")
PCA_DIMS = 50
"""t-SNE runs on the first 50 principal components (the usual pre-reduction)."""
MIN_IMAGES = {"tsne": 4, "pca": 3}
DPI = 100
EMBED_FORMAT = "ssl-embeddings/1"
"""The ``format`` of an ``ssl embed`` file (``ssl_cli.eval.embed``)."""
MAX_LEGEND = 20
"""Classes beyond this many are drawn without a legend (it would not fit)."""


def read_embeddings(path: str | Path) -> dict[str, Any] | None:
    """An ``ssl embed`` output: ``features`` (N x D), ``labels`` (N, -1 when unknown), ``classes``, ``name`` (the
    embedded folder's name); None when ``path`` is some other file (a checkpoint)."""
    import json

    path = Path(path).expanduser()
    if path.suffix == ".npy" and path.with_suffix(".json").is_file():
        try:
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict) or meta.get("format") != EMBED_FORMAT:
            return None
        try:
            features = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the embeddings {path}: {e}") from None
        labels = meta.get("labels")
    elif path.suffix == ".safetensors" and path.is_file():
        from ssl_cli.artifacts.safetensors_io import read_safetensors

        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("format") != EMBED_FORMAT:
                    return None
        except Exception:  # noqa: BLE001 - not readable as safetensors: let the checkpoint reader say why
            return None
        tensors, meta = read_safetensors(path)
        if "embeddings" not in tensors:
            raise CheckpointError(f"{path}: an ssl embed file without its 'embeddings' tensor")
        features = tensors["embeddings"].float()
        labels = tensors.get("labels")
    else:
        return None
    if features.dim() != 2:
        raise CheckpointError(f"{path}: embeddings of shape {tuple(features.shape)}, expected N x D")
    n = features.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
    if labels.shape != (n,):
        raise CheckpointError(f"{path}: {labels.numel()} labels for {n} embeddings")
    classes = [str(c) for c in meta.get("classes") or []]
    name = Path(str(meta.get("data") or path.stem)).name
    return {"features": features, "labels": labels, "classes": classes, "name": name}


def balanced_sample(labels: torch.Tensor, max_images: int, seed: int = 0) -> torch.Tensor:
    """At most ``max_images`` indices, class-balanced and seeded: images are taken from each class's seeded
    shuffle in turn (the classes in a seeded order), so class counts differ by at most one, except that a class
    with too few images gives all it has and the others fill its share. Unlabeled images (label < 0) form one
    group. Sorted indices."""
    if max_images < 1:
        raise DataError(f"--num-images {max_images}: must be 1 or more")
    labels = torch.as_tensor(labels).long()
    if max_images >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    groups = []
    for value in torch.unique(labels).tolist():  # sorted label values
        members = torch.nonzero(labels == value).flatten()
        groups.append(members[torch.randperm(len(members), generator=g)])
    # round r takes the r-th image of every class that still has one, the classes in a seeded order (so fewer
    # images than classes are not always the first classes)
    turn = torch.randperm(len(groups), generator=g)
    rank = torch.cat([torch.arange(len(m)) for m in groups])
    group = torch.cat([torch.full((len(m),), int(turn[i])) for i, m in enumerate(groups)])
    order = torch.argsort(rank * len(groups) + group)
    picked = torch.cat(groups)[order[:max_images]]
    return picked.sort().values


def project(features: np.ndarray, method: str = "tsne", seed: int = 0, perplexity: float = 30.0) -> dict[str, Any]:
    """2-D coordinates of ``features`` (N x D) by ``method``: ``points`` (N x 2), and for PCA the explained
    variance ratio of the two axes, for t-SNE the perplexity used (at most (N - 1) / 3)."""
    from sklearn.decomposition import PCA

    if method not in METHODS:
        raise DataError(f"--method {method}: unknown; valid: {', '.join(METHODS)}")
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n < MIN_IMAGES[method]:
        raise DataError(f"--method {method} needs at least {MIN_IMAGES[method]} images, got {n}")
    if method == "pca":
        pca = PCA(n_components=2, svd_solver="full", random_state=seed)
        points = pca.fit_transform(x)
        return {"points": points, "explained_variance": [float(v) for v in pca.explained_variance_ratio_]}
    from sklearn.manifold import TSNE

    if perplexity <= 0:
        raise DataError(f"--perplexity {perplexity}: must be positive (5 to 50 is usual)")
    dims = min(PCA_DIMS, n, x.shape[1])
    reduced = PCA(n_components=dims, svd_solver="full", random_state=seed).fit_transform(x) if dims < x.shape[1] else x
    used = min(float(perplexity), (n - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto", random_state=seed)
    points = tsne.fit_transform(reduced.astype(np.float32))
    return {"points": points.astype(np.float64), "perplexity": used}


def nn_agreement(points: np.ndarray, labels: np.ndarray, cosine: bool = False) -> float | None:
    """Share of points whose nearest other point has the same label (Euclidean, or cosine); None if unlabeled."""
    labels = np.asarray(labels)
    if len(points) < 2 or (labels < 0).any():
        return None
    x = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    if cosine:
        x = torch.nn.functional.normalize(x, dim=1)
        dist = -(x @ x.T)
    else:
        dist = torch.cdist(x, x)
    dist.fill_diagonal_(math.inf)
    nearest = dist.argmin(1).numpy()
    return float((labels[nearest] == labels).mean())


def draw(
    points: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    out: Path,
    title: str,
    axis_labels: tuple[str, str],
    width: int = 1000,
    height: int = 800,
) -> None:
    """The scatter, one colour per class with the class names in a legend beside the plot (unlabeled: one
    colour, no legend)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if width < 200 or height < 150:
        raise DataError(f"--width {width} --height {height}: too small for a figure (at least 200 x 150 pixels)")
    labels = np.asarray(labels)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    size = float(np.clip(24000 / max(len(points), 1), 8, 40))  # marker area (points^2): 12 at 2,000 points
    present = sorted(set(labels.tolist()))
    if present == [-1] or not classes:
        ax.scatter(points[:, 0], points[:, 1], s=size, color="C0", alpha=0.7, linewidths=0)
    else:
        cmap = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
        for label in present:
            where = labels == label
            color = cmap(label % cmap.N) if len(classes) <= 20 else cmap(label / max(len(classes) - 1, 1))
            name = classes[label] if 0 <= label < len(classes) else "unlabeled"
            ax.scatter(points[where, 0], points[where, 1], s=size, color=color, alpha=0.75, linewidths=0, label=name)
        if len(present) <= MAX_LEGEND:
            ax.legend(  # beside the axes, not over the points
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                borderaxespad=0.0,
                markerscale=max(1.0, 8 / math.sqrt(size)),
                frameon=False,
                title="class",
            )
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_aspect("equal", adjustable="datalim")
    if axis_labels[0].startswith("t-SNE"):  # t-SNE's coordinates have no units worth reading
        ax.set_xticks([])
        ax.set_yticks([])
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def embedding_map(
    checkpoint: str | Path,
    data: str | None,
    out: Path,
    num_images: int = 2000,
    method: str = "tsne",
    perplexity: float = 30.0,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int | str = "auto",
    device: str = "auto",
    random_init: bool = False,
    output_view: str | None = None,
    width: int = 1000,
    height: int = 800,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Features of a class-balanced sample of ``data`` (or of an ``ssl embed`` file given as ``checkpoint``)
    -> 2-D by ``method`` -> a scatter PNG at ``out``."""
    from ssl_cli.plots.features import encode, load_encoder, open_images

    if method not in METHODS:
        raise DataError(f"--method {method}: unknown; valid: {', '.join(METHODS)}")
    embedded = read_embeddings(checkpoint)
    if embedded is not None:
        if data is not None:
            raise DataError(
                f"--data {data}: {checkpoint} is an ssl embed file that holds its features; leave --data out"
            )
        if random_init or output_view is not None:
            flag = "--random-init" if random_init else f"--output-view {output_view}"
            raise DataError(f"{flag}: {checkpoint} is an ssl embed file, not a checkpoint")
        picked = balanced_sample(embedded["labels"], num_images, seed)
        feats, labels = embedded["features"][picked], embedded["labels"][picked]
        classes, set_name, backbone = embedded["classes"], embedded["name"], "embedded"
    else:
        if data is None:
            raise DataError(f"--data is needed: the images whose {Path(checkpoint).name} features to map")
        encoder = load_encoder(checkpoint, device, random_init, output_view)
        images = open_images(data)
        sample = images.subset(balanced_sample(images.labels, num_images, seed))
        if len(sample) < MIN_IMAGES[method]:
            raise DataError(
                f"--data {data}: {len(sample)} image(s); --method {method} needs {MIN_IMAGES[method]} or more"
            )
        if on_total:
            on_total(len(sample))
        feats, labels = encode(encoder, sample, batch_size, num_workers, progress)
        classes, set_name, backbone = images.classes, images.name, encoder.name
    if len(feats) < MIN_IMAGES[method]:
        raise DataError(f"{len(feats)} image(s) to map; --method {method} needs at least {MIN_IMAGES[method]}")
    feats = torch.nn.functional.normalize(feats.double(), dim=1).numpy()
    labels = labels.numpy()
    if log:
        what = f"t-SNE (PCA to {min(PCA_DIMS, *feats.shape)} dimensions first)" if method == "tsne" else "PCA"
        log(f"{what} of {len(feats)} features")
    result = project(feats, method, seed, perplexity)
    points = result["points"]
    if method == "pca":
        ev = result["explained_variance"]
        axis_labels = (f"PC 1 ({ev[0]:.1%} of the variance)", f"PC 2 ({ev[1]:.1%})")
    else:
        axis_labels = ("t-SNE 1", "t-SNE 2")
    feature_nn = nn_agreement(feats, labels, cosine=True)
    map_nn = nn_agreement(points, labels)
    weights = "random weights" if random_init else Path(checkpoint).name
    name = {"tsne": "t-SNE", "pca": "PCA"}[method]
    title = f"{name} of {backbone} features ({weights}), {len(feats)} images of {set_name}"
    if feature_nn is not None and map_nn is not None:
        title += f"\nnearest neighbour of the same class: {feature_nn:.1%} in feature space, {map_nn:.1%} in 2-D"
    draw(points, labels, classes, out, title, axis_labels, width, height)
    counts = {}
    if classes and (labels >= 0).all():
        for label, count in zip(*np.unique(labels, return_counts=True), strict=True):
            counts[classes[int(label)] if int(label) < len(classes) else str(int(label))] = int(count)
    return {
        "out": str(out),
        "method": method,
        "images": len(feats),
        "per_class": counts,
        "nn_agreement_features": feature_nn,
        "nn_agreement_2d": map_nn,
        "random_init": random_init,
        **({"output_view": output_view} if output_view is not None else {}),
        **({"explained_variance": result["explained_variance"]} if method == "pca" else {}),
        **({"perplexity": result["perplexity"]} if method == "tsne" else {}),
    }
