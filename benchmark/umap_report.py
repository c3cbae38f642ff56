"""Figure 5 of the seed paper: UMAP of restored representations under white-box PGD.

For each chosen defense of a finished run: PGD-20 (``report.umap_steps``) against the whole defended model on
``n`` test images, purify the adversarial images, take the target's penultimate
features of the restorations, embed them with UMAP (umap-learn) and draw one panel per
defense colored by the true class, with the silhouette score of the classes in feature
space (and in the embedding) printed on the panel: a number, not only a picture.

The run's own artifacts are loaded (never trained here): ``python run_benchmark.py umap
RUN_DIR [--defenses HGD DIR] [--n 500]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from attacks.pgd import pgd_linf
from benchmark.data import load_dataset
from benchmark.errors import BenchError
from benchmark.experiment import config_from_dict, prepare_defense, prepare_target
from benchmark.runtime import resolve_device
from defenses.base import DefendedModel


def class_separation(features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(silhouette_score(features, labels))


# Below this many points umap-learn computes the exact neighbours itself (brute force); we hand it the
# same exact neighbours instead, which spares the numba compilation of its own search (about 6 s of
# the smoke report on a 2-core CPU). Above it umap's approximate search (NN-descent) is left alone.
EXACT_KNN_BELOW = 4096


def exact_knn(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's k nearest points in Euclidean distance, itself first (UMAP's convention):
    (indices int32, distances float32), ties broken by index."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.sqrt(np.take_along_axis(d2, idx, axis=1)).astype(np.float32)


# umap-learn's neighbourhood weights (its ``smooth_knn_dist`` and ``compute_membership_strengths``)
# are numba functions compiled with parallel=True and without a cache: every process pays about 9 s
# on 2 cores to compile them before computing in milliseconds what NumPy computes as fast at these
# sizes. Below EXACT_KNN_BELOW points the embedding uses the NumPy versions below: the same
# algorithm step by step (tests compare them with umap-learn's on the same neighbours).
SMOOTH_K_TOLERANCE, MIN_K_DIST_SCALE = 1e-5, 1e-3  # umap-learn's constants


def smooth_knn_dist(distances: np.ndarray, k: float, n_iter: int = 64, local_connectivity: float = 1.0,
                    bandwidth: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(sigma, rho) per point: rho the distance to its nearest neighbour (interpolated for a
    fractional ``local_connectivity``), sigma by binary search such that the sum over its other
    neighbours of exp(-(d - rho) / sigma) is log2(k) * bandwidth, floored at 1e-3 of the mean
    distance, as umap-learn's (float32 search, all points at once)."""
    distances = np.asarray(distances, dtype=np.float32)
    n = len(distances)
    target = np.float32(np.log2(k) * bandwidth)
    rho = np.zeros(n, dtype=np.float32)
    index, interpolation = int(np.floor(local_connectivity)), local_connectivity - np.floor(local_connectivity)
    for i in range(n):
        nonzero = distances[i][distances[i] > 0.0]
        if len(nonzero) >= local_connectivity:
            if index > 0:
                rho[i] = nonzero[index - 1]
                if interpolation > SMOOTH_K_TOLERANCE:
                    rho[i] += interpolation * (nonzero[index] - nonzero[index - 1])
            else:
                rho[i] = interpolation * nonzero[0]
        elif len(nonzero) > 0:
            rho[i] = nonzero.max()
    floatmax = np.finfo(np.float32).max
    lo, hi, mid = np.zeros(n, np.float32), np.full(n, floatmax, np.float32), np.ones(n, np.float32)
    active = np.ones(n, dtype=bool)
    d = distances[:, 1:] - rho[:, None]
    for _ in range(n_iter):
        with np.errstate(over="ignore"):
            psum = np.where(d > 0, np.exp(-(d / mid[:, None])), np.float32(1.0)).sum(1, dtype=np.float32)
        active &= ~(np.abs(psum - target) < SMOOTH_K_TOLERANCE)
        if not active.any():
            break
        high = active & (psum > target)
        low = active & ~(psum > target)
        hi = np.where(high, mid, hi)
        lo = np.where(low, mid, lo)
        mid = np.where(high | (low & (hi < floatmax)), (lo + hi) / np.float32(2.0),
                       np.where(low, mid * np.float32(2.0), mid)).astype(np.float32)
    floor = np.where(rho > 0.0, MIN_K_DIST_SCALE * distances.mean(1), MIN_K_DIST_SCALE * distances.mean())
    return np.maximum(mid, floor).astype(np.float32), rho


def membership_strengths(knn_indices: np.ndarray, knn_dists: np.ndarray, sigmas: np.ndarray, rhos: np.ndarray,
                         return_dists: bool = False, bipartite: bool = False):
    """(rows, cols, vals, dists) of each point's fuzzy set over its neighbours: 1 up to rho,
    exp(-(d - rho) / sigma) beyond, 0 for the point itself, as umap-learn's."""
    n, k = knn_indices.shape
    knn_dists = np.asarray(knn_dists, dtype=np.float32)
    gap = knn_dists - rhos[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        vals = np.where((gap <= 0.0) | (sigmas[:, None] == 0.0), np.float32(1.0), np.exp(-(gap / sigmas[:, None])))
    rows = np.repeat(np.arange(n, dtype=np.int32), k)
    if not bipartite:
        vals = np.where(knn_indices == np.arange(n)[:, None], np.float32(0.0), vals)
    missing = (knn_indices == -1).ravel()
    rows, cols, vals = rows.copy(), knn_indices.astype(np.int32).ravel().copy(), vals.astype(np.float32).ravel()
    rows[missing], cols[missing], vals[missing] = 0, 0, 0.0
    dists = knn_dists.ravel().copy() if return_dists else None
    if dists is not None:
        dists[missing] = 0.0
    return rows, cols, vals, dists


def embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    import umap
    import umap.umap_ as umap_module

    k = min(15, len(features) - 1)
    knn, patched = {}, {}
    if len(features) < EXACT_KNN_BELOW:
        indices, distances = exact_knn(features, k)
        knn = {"precomputed_knn": (indices, distances, None)}
        patched = {"smooth_knn_dist": smooth_knn_dist, "compute_membership_strengths": membership_strengths}
    reducer = umap.UMAP(n_components=2, n_neighbors=k, min_dist=0.1, random_state=seed,
                        n_jobs=1, **knn)  # seeded: single-threaded anyway (saying so silences its warning)
    saved = {name: getattr(umap_module, name) for name in patched}
    try:
        for name, fn in patched.items():
            setattr(umap_module, name, fn)
        return reducer.fit_transform(features)
    finally:
        for name, fn in saved.items():
            setattr(umap_module, name, fn)


def restored_features(run_dir: Path, defenses: list[str] | None, n: int | None, steps: int = 20,
                      device: str = "auto", dataset: str | None = None, target: str | None = None) -> dict:
    """{defense name: (features, labels)} from the run's artifacts; PGD through the defended model."""
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    cfg = config_from_dict(manifest["config"], f"{run_dir}/manifest.json config")
    dev = resolve_device(device if device != "auto" else cfg.device)
    ds = next((d for d in cfg.datasets if dataset in (None, d.name)), None)
    tspec = next((t for t in cfg.targets if target in (None, t.name)), None)
    if ds is None or tspec is None:
        raise BenchError(f"{run_dir}: no dataset {dataset!r} / target {target!r} in the run's config")
    names = defenses or [d.name for d in cfg.defenses]
    specs = {d.name: d for d in cfg.defenses}
    unknown = [d for d in names if d not in specs]
    if unknown:
        raise BenchError(f"{run_dir}: defenses {unknown} are not in the run; it has {sorted(specs)}")
    artifacts = Path(run_dir) / "artifacts"
    loaded: dict[str, tuple] = {}

    def target_named(name: str) -> tuple:
        if name not in loaded:
            spec = next(t for t in cfg.targets if t.name == name)
            loaded[name] = prepare_target(ds, spec, cfg, dev, artifacts, progress=False, train=False)[:2]
        return loaded[name]

    classifier, _ = target_named(tspec.name)
    test = load_dataset(ds.name, "test", root=ds.root, **ds.options)
    test = test.subset(min(500, len(test)) if n is None else n, seed=cfg.seed).to(dev)  # default: at most the split
    x, y = test.as_float(), test.labels
    eps, step = cfg.threat.eps, cfg.threat.step_size
    out = {}
    for name in names:
        # a row trained against another target (Table 2) is looked up under that target's artifact
        trained_on, trained_card = target_named(specs[name].trained_against or tspec.name)
        defense, _ = prepare_defense(ds, specs[name], trained_on, trained_card, cfg, dev, artifacts, train_data=None,
                                     data_shape=(test.channels, test.image_size[0]), progress=False, train=False)
        defense.seed(cfg.seed, dev)
        model = DefendedModel.for_defense(defense, classifier)
        clf = model.classifier
        feats = []
        for i in range(0, len(x), 250):
            xb, yb = x[i:i + 250], y[i:i + 250]
            adv = pgd_linf(model, xb, yb, eps=eps, step_size=step, steps=steps)
            with torch.no_grad():
                feats.append(clf.features(defense.purify(adv)).float().cpu())
        out[name] = (torch.cat(feats).numpy(), y.cpu().numpy())
    return out


def umap_figure(data: dict, stem: Path, seed: int = 0, steps: int = 20) -> tuple[list[Path], dict]:
    """One UMAP panel per defense; returns (files, {defense: silhouette in feature space, in 2-D})."""
    from benchmark.reports import _plt, _save

    plt = _plt()
    k = len(data)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.6), squeeze=False)
    scores = {}
    classes = sorted({int(c) for _, labels in data.values() for c in labels})
    for ax, (name, (feats, labels)) in zip(axes[0], data.items()):
        emb = embed(feats, seed)
        s_feat, s_emb = class_separation(feats, labels), class_separation(emb, labels)
        scores[name] = {"silhouette_features": s_feat, "silhouette_umap": s_emb, "n": int(len(labels)),
                        "pgd_steps": steps}
        ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", vmin=0, vmax=9, s=4, alpha=0.8)
        ax.set_title(name)
        ax.text(0.02, 0.02, f"silhouette: {s_feat:.3f} (features), {s_emb:.3f} (UMAP)", transform=ax.transAxes,
                fontsize=7, va="bottom")
        ax.set_xticks([])
        ax.set_yticks([])
    cmap = plt.get_cmap("tab10")
    handles = [plt.Line2D([], [], ls="", marker="o", ms=5, color=cmap(c % 10), label=str(c)) for c in classes]
    fig.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               title_fontsize=7, frameon=False)
    n = max(int(len(labels)) for _, labels in data.values())
    paths = _save(fig, stem, f"Restored representations under white-box PGD-{steps} (the target's penultimate features of "
                             f"the defended images, n = {n} test images, embedded by UMAP): one colour per true class; "
                             "silhouette scores in the features and in the embedding.")
    plt.close(fig)
    return paths, scores


def write_umap(run_dir: Path, defenses: list[str] | None = None, n: int | None = None, device: str = "auto",
               dataset: str | None = None, target: str | None = None, steps: int = 20) -> list[Path]:
    from benchmark.io import atomic_write_json

    data = restored_features(run_dir, defenses, n, steps=steps, device=device, dataset=dataset, target=target)
    out = Path(run_dir) / "report" / "figures"
    paths, scores = umap_figure(data, out / "umap_restored", steps=steps)
    paths.append(atomic_write_json(out / "umap_restored.json", scores))
    return paths
