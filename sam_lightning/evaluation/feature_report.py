"""Pictures and report of captured encoder features (`python -m sam_lightning.features`).

Per image and module: the most active channels, the spatial mean / max / std maps over the image,
channel importance, a PCA-to-RGB picture of the tokens, the similarity between views, a 2-D
embedding of the views' tokens; per run: `report.md`, and `compare.png` against a baseline.
Only tokens that cover the image are shown: the encoder's zero-padded border is cut away.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from sam_lightning.errors import UserError

try:  # t-SNE is optional (the `dev` extra installs scikit-learn)
    from sklearn.manifold import TSNE
except ImportError:  # pragma: no cover - depends on the environment
    TSNE = None

#: one picture file per kind, per (image, module): `pictures/<image>/<module>_<kind>.png`
PICTURES = ("channels", "maps", "importance", "pca", "similarity", "embedding")


def valid_tokens(
    features: torch.Tensor, input_size: tuple[int, int], image_size: int
) -> torch.Tensor:
    """[C, h, w] -> the tokens that cover the image (the padded rows/columns cut away)."""
    th, tw = features.shape[-2:]
    vh = max(1, math.ceil(input_size[0] * th / image_size))
    vw = max(1, math.ceil(input_size[1] * tw / image_size))
    return features[..., :vh, :vw]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[h, w] map -> [H, W] (bilinear) for overlaying on the original image."""
    out = torch.nn.functional.interpolate(
        grid[None, None].float(), size=size, mode="bilinear", align_corners=False
    )
    return out[0, 0].numpy()


def plot_channel_grid(
    features: torch.Tensor, channels: list[int], activity: torch.Tensor, path: Path, k: int = 16
) -> Path:
    """The k most active channels of one view ([C, h, w], image tokens only), each on its own
    colour scale, titled with its channel number and mean |activation|."""
    order = torch.argsort(activity, descending=True)[:k].tolist()
    cols = min(8, len(order))
    rows = math.ceil(len(order) / cols)
    fig = Figure(figsize=(1.6 * cols, 1.75 * rows + 0.5), dpi=90)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, i in zip(axes, order, strict=False):
        ax.imshow(features[i].numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"ch {channels[i]}  {float(activity[i]):.2g}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{len(order)} most active channels (by mean |activation|), each with its own colour scale",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_activation_maps(image: np.ndarray, features: torch.Tensor, path: Path, title: str) -> Path:
    """The image, then the mean, max and std over channels at each token, upsampled onto it."""
    size = image.shape[:2]
    maps = {
        "mean over channels": features.mean(0),
        "max over channels": features.amax(0),
        "std over channels": features.std(0) if features.shape[0] > 1 else features[0] * 0,
    }
    aspect = size[1] / size[0]
    fig = Figure(figsize=(4 * 2.6 * min(aspect, 1.6) + 0.6, 3.0), dpi=90)
    axes = fig.subplots(1, 4)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    for ax, (name, grid) in zip(axes[1:], maps.items(), strict=True):
        ax.imshow(image)
        shown = ax.imshow(_upsample(grid, size), cmap="inferno", alpha=0.6)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_channel_importance(
    activity: torch.Tensor, channels: list[int], path: Path, title: str, top: int = 10
) -> Path:
    """Mean |activation| of every channel as bars; the `top` most active in red, numbered."""
    values = activity.numpy()
    best = set(torch.argsort(activity, descending=True)[:top].tolist())
    colours = ["tab:red" if i in best else "tab:gray" for i in range(len(values))]
    fig = Figure(figsize=(8, 2.8), dpi=90)
    ax = fig.subplots()
    ax.bar(np.arange(len(values)), values, color=colours, width=1.0)
    for i in best:
        ax.annotate(
            str(channels[i]),
            (i, values[i]),
            textcoords="offset points",
            xytext=(0, 2),
            ha="center",
            fontsize=6,
            color="tab:red",
        )
    ax.set_xlim(-1, len(values))
    ax.set_xlabel("channel (position among the captured channels)")
    ax.set_ylabel("mean |activation|")
    ax.set_title(f"{title}: channel importance, the {top} most active in red", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def pca_basis(
    tokens: torch.Tensor, components: int, max_rows: int = 8192
) -> tuple[torch.Tensor, ...]:
    """(mean [C], basis [C, k]) of the principal components of tokens [N, C] (fit on at most
    `max_rows` evenly spaced rows)."""
    fit = tokens[:: max(1, len(tokens) // max_rows)].double()
    mean = fit.mean(0)
    _, _, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    return mean, vh[:components].T


def _view_tokens(views: dict[str, torch.Tensor], sizes: dict[str, list], image_size: int) -> list:
    """[(label, [C, vh, vw])] for the global view and every crop, image tokens only."""
    out = []
    for view, feats in views.items():
        for b in range(feats.shape[0]):
            label = "global" if view == "global" else f"crop {b}"
            out.append((label, valid_tokens(feats[b], sizes[view][b], image_size)))
    return out


def plot_pca_rgb(
    image: np.ndarray,
    views: dict[str, torch.Tensor],
    sizes: dict[str, list],
    boxes: list[tuple[int, ...]],
    image_size: int,
    path: Path,
    title: str,
) -> Path:
    """The tokens' first three principal components as red, green, blue: fit on the tokens of
    all views together, so one colour means one direction in feature space in every panel."""
    items = _view_tokens(views, sizes, image_size)
    flat = [t.flatten(1).T for _, t in items]
    mean, basis = pca_basis(torch.cat(flat), 3)
    projected = [(f.double() - mean) @ basis for f in flat]
    everything = torch.cat(projected)
    low, high = everything.quantile(0.01, dim=0), everything.quantile(0.99, dim=0)
    panels = 1 + len(items)
    cols = min(panels, 6)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(2.4 * cols, 2.5 * rows + 0.4), dpi=90)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    axes[0].imshow(image)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        axes[0].add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=f"C{k % 10}", linewidth=2)
        )
        axes[0].text(
            x0 + 3, y0 + 3, str(k), color="black", fontsize=7, va="top",
            bbox={"facecolor": f"C{k % 10}", "alpha": 0.8, "pad": 1, "linewidth": 0},
        )  # fmt: skip
    axes[0].set_title("image" + (" and crops" if boxes else ""), fontsize=8)
    for ax, (label, tokens), proj in zip(axes[1:], items, projected, strict=False):
        rgb = ((proj - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
        ax.imshow(rgb.reshape(*tokens.shape[1:], 3).numpy(), interpolation="nearest")
        ax.set_title(label, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(f"{title}: tokens, PCA to RGB (first 3 components of all views)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def token_similarity(
    views: dict[str, torch.Tensor], sizes: dict[str, list], image_size: int, max_tokens: int = 1024
) -> tuple[list[str], list[int], torch.Tensor]:
    """Patch-to-patch cosine similarity of the image tokens of every view, view after view.

    Tokens are centred on the mean token of all views first (otherwise the offset every token
    shares makes everything look alike) and each view keeps evenly spaced tokens so the matrix
    has at most about `max_tokens` rows. Returns (view labels, tokens per view, [T, T] matrix).
    """
    items = _view_tokens(views, sizes, image_size)
    total = sum(t.shape[1] * t.shape[2] for _, t in items)
    step = max(1, math.ceil(total / max_tokens))
    kept = [t.flatten(1).T[::step].double() for _, t in items]
    tokens = torch.cat(kept)
    tokens = torch.nn.functional.normalize(tokens - tokens.mean(0), dim=1)
    return [label for label, _ in items], [len(k) for k in kept], tokens @ tokens.T


def plot_token_similarity(
    views: dict[str, torch.Tensor], sizes: dict[str, list], image_size: int, path: Path, title: str
) -> Path:
    """The patch-to-patch similarity matrix across the global view and the crops, the views
    separated by lines: bright off-diagonal blocks are crops whose tokens resemble each other."""
    labels, counts, matrix = token_similarity(views, sizes, image_size)
    edges = np.cumsum([0, *counts])
    n = len(labels)
    blocks = np.array(
        [[float(matrix[edges[i] : edges[i + 1], edges[j] : edges[j + 1]].mean()) for j in range(n)]
         for i in range(n)]
    )  # fmt: skip
    fig = Figure(figsize=(10.5, 5.0), dpi=90)
    ax, summary = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    shown = ax.imshow(matrix.numpy(), cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity (centred)")
    for edge in edges[1:-1]:
        ax.axhline(edge - 0.5, color="black", linewidth=0.6)
        ax.axvline(edge - 0.5, color="black", linewidth=0.6)
    middles = (edges[:-1] + edges[1:]) / 2 - 0.5
    ax.set_xticks(middles, labels, rotation=90, fontsize=7)
    ax.set_yticks(middles, labels, fontsize=7)
    ax.set_title("every token against every token (row-major within a view)", fontsize=8)
    limit = max(float(np.abs(blocks).max()), 1e-6)
    summary.imshow(blocks, cmap="coolwarm", vmin=-limit, vmax=limit)
    if n <= 17:
        for i in range(n):
            for j in range(n):
                summary.text(j, i, f"{blocks[i, j]:.2f}", ha="center", va="center", fontsize=7)
    summary.set_xticks(range(n), labels, rotation=90, fontsize=7)
    summary.set_yticks(range(n), labels, fontsize=7)
    summary.set_title("mean of each block: how alike two views' tokens are", fontsize=8)
    fig.suptitle(f"{title}: patch-to-patch cosine similarity across the views", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def embed_2d(tokens: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, C] -> [N, 2] by PCA, or t-SNE (`method="tsne"`, needs scikit-learn)."""
    if method == "pca":
        mean, basis = pca_basis(torch.as_tensor(tokens), 2)
        return ((torch.as_tensor(tokens).double() - mean) @ basis).numpy()
    if method == "tsne":
        if TSNE is None:
            raise UserError(
                "embedding=tsne needs scikit-learn: pip install scikit-learn (or embedding=pca)"
            )
        perplexity = float(min(30, max(2, (len(tokens) - 1) // 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(tokens)
    raise UserError(f"embedding={method}: expected pca or tsne")


def plot_view_embedding(
    views: dict[str, torch.Tensor],
    sizes: dict[str, list],
    image_size: int,
    path: Path,
    title: str,
    method: str = "pca",
    max_tokens: int = 2000,
) -> Path:
    """Every image token of every view as a point in 2-D (PCA or t-SNE), coloured by view; where
    the crops' clouds sit against the global view's shows how much the local context moves them."""
    items = _view_tokens(views, sizes, image_size)
    tokens = [t.flatten(1).T.numpy() for _, t in items]
    total = sum(len(t) for t in tokens)
    step = max(1, math.ceil(total / max_tokens))
    kept = [t[::step] for t in tokens]
    points = embed_2d(np.concatenate(kept).astype(np.float64), method)
    fig = Figure(figsize=(5.2, 4.2), dpi=90)
    ax = fig.subplots()
    start = 0
    cmap = colormaps["tab10"]
    for k, ((label, _), chunk) in enumerate(zip(items, kept, strict=True)):
        xy = points[start : start + len(chunk)]
        start += len(chunk)
        colour = "black" if label == "global" else cmap((k - 1) % 10)
        ax.scatter(xy[:, 0], xy[:, 1], s=4, color=colour, alpha=0.5, label=label, linewidths=0)
    ax.legend(fontsize=6, markerscale=3, loc="best", ncol=1 + len(items) // 10)
    ax.set_xticks([])
    ax.set_yticks([])
    name = "PCA" if method == "pca" else "t-SNE"
    shown = f"every {step}th token" if step > 1 else "every token"
    ax.set_title(f"{title}: 2-D {name} of the views' tokens ({shown})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_similarity(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """compare.png: linear CKA and mean cosine similarity per captured module, input to output."""
    names = list(results)
    cka = [results[n]["cka"] if results[n]["cka"] is not None else np.nan for n in names]
    cosine = [
        results[n]["mean_cosine"] if results[n]["mean_cosine"] is not None else np.nan
        for n in names
    ]
    fig = Figure(figsize=(max(5.0, 0.5 * len(names) + 2), 3.8), dpi=100)
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.plot(x, cka, marker="o", label="linear CKA")
    ax.plot(x, cosine, marker="s", linestyle="--", label="mean cosine similarity")
    for i, value in enumerate(cka):
        if not np.isnan(value):
            ax.annotate(f"{value:.3f}", (i, value), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=7)  # fmt: skip
    for i, name in enumerate(names):
        if results[name].get("max_abs_difference") == 0.0:
            ax.annotate("unchanged", (i, 1.0), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize=6, color="tab:green")  # fmt: skip
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    lowest = float(np.nanmin(cosine + cka)) if not np.all(np.isnan(cosine + cka)) else 0.0
    ax.set_ylim(max(-1.0, lowest - 0.3 * (1 - lowest) - 0.01), 1.0 + 0.25 * (1 - lowest) + 0.01)
    ax.set_ylabel("similarity to the baseline")
    ax.set_xlabel("image-encoder module (input to output)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def image_thumbnail(image: np.ndarray, long_side: int = 512) -> np.ndarray:
    """The image shrunk for the pictures (full-resolution photos make slow, large PNGs)."""
    h, w = image.shape[:2]
    if max(h, w) <= long_side:
        return image
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def report_markdown(manifest: dict[str, Any]) -> str:
    """report.md: the run, per module over all images, per image and module (shapes, statistics,
    the 10 most active channels, pictures), and the comparison with the baseline."""
    stride = manifest["channel_stride"]
    channels = "all channels" if stride == 1 else f"every {stride}th channel"
    lines = [
        "# Encoder features",
        "",
        f"Checkpoint `{manifest['ckpt']}` ({manifest['model']}, captured in "
        f"{manifest['precision']}, saved as {manifest['dtype']}); {len(manifest['images'])} "
        f"images, global view + {manifest['crops']} crops (overlap {manifest['overlap']}), "
        f"{channels}. Statistics over all activations; near zero: |x| < {manifest['near_zero']}. "
        "Most active channels: by mean |activation|, numbered as in the module.",
        "",
        "## Per module, over all images and views",
        "",
        "| module | mean | std | min | max | near zero |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, stats in manifest["modules"].items():
        cells = [_number(stats[k]) for k in ("mean", "std", "min", "max", "near_zero_fraction")]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    compare = manifest.get("compare")
    if compare:
        lines += [
            "",
            "## Against the baseline",
            "",
            f"Baseline `{compare['baseline']}`, the same images and views. Linear CKA 1.0: the "
            "same representation (up to rotation and scale); max |difference| 0: unchanged.",
            "",
            "| module | linear CKA | mean cosine | max abs difference | tokens |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in compare["modules"].items():
            lines.append(
                f"| `{name}` | {_number(row['cka'])} | {_number(row['mean_cosine'])} | "
                f"{_number(row['max_abs_difference'])} | {row['tokens']} |"
            )
        lines += ["", f"![per-layer similarity]({compare['plot']})"]
    by_image: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest["files"]:
        by_image.setdefault(entry["image"], []).append(entry)
    for image in manifest["images"]:
        pictures = image.get("pictures") or {}
        if not pictures:
            continue
        lines += [
            "",
            f"## {image['image']} ({image['size'][1]} x {image['size'][0]} px, w x h)",
            "",
        ]
        for module in manifest["layers"]:
            lines += [
                f"### `{module}`",
                "",
                "| view | shape [B, C, H, W] | mean | std | min | max | near zero | 10 most active channels |",
                "|---|---|---:|---:|---:|---:|---:|---|",
            ]
            for entry in by_image[image["image"]]:
                if entry["module"] != module:
                    continue
                stats = entry["stats"]
                cells = [
                    _number(stats[k]) for k in ("mean", "std", "min", "max", "near_zero_fraction")
                ]
                top = ", ".join(str(c) for c, _ in entry["top_channels"])
                shape = "x".join(map(str, entry["shape"]))
                lines.append(f"| {entry['view']} | {shape} | " + " | ".join(cells) + f" | {top} |")
            lines.append("")
            for kind, path in pictures.get(module, {}).items():
                lines.append(f"![{module} {kind}]({path})")
            lines.append("")
    return "\n".join(lines) + "\n"
