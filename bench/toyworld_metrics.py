"""Distribution metrics for the toy world, as pure functions of feature arrays (numpy, float64).

Every function takes features [N, D] (one row per sample) and returns numbers; nothing here
knows about models, files or the world's generator, so each can be checked against closed-form
answers on synthetic Gaussians (tests/test_toyworld.py).
"""
from __future__ import annotations

import numpy as np


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D] (N >= 2)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance_gaussians(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(C1 + C2 - 2 (C1 C2)^½): the 2-Wasserstein distance² of two Gaussians.

    tr (C1 C2)^½ is the sum of the square roots of the eigenvalues of C1 C2, which are real and
    non-negative for covariance matrices (C1 C2 is similar to C1^½ C2 C1^½), so no matrix square
    root is needed; round-off imaginary parts and tiny negatives are dropped."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    eigenvalues = np.linalg.eigvals(np.asarray(cov1, np.float64) @ np.asarray(cov2, np.float64))
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets."""
    return frechet_distance_gaussians(*gaussian_fit(features), *gaussian_fit(reference))


def frechet_terms(features: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """The Fréchet distance split: the mean term per feature ((mu1 - mu2)² [D]) and the covariance
    term (the rest); they sum to frechet_distance. Which features a distance is made of."""
    mu1, cov1 = gaussian_fit(features)
    mu2, cov2 = gaussian_fit(reference)
    mean_terms = (mu1 - mu2) ** 2
    return mean_terms, frechet_distance_gaussians(mu1, cov1, mu2, cov2) - float(mean_terms.sum())


def nearest_mode(features: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """Index of the nearest mode (Euclidean) for each row of features [N, D]; modes [K, D]."""
    d = ((np.asarray(features)[:, None, :] - np.asarray(modes)[None, :, :]) ** 2).sum(-1)
    return d.argmin(axis=1)


def mode_hits(features: np.ndarray, modes: np.ndarray, target: int) -> float:
    """Fraction of samples (all asked for class `target`) whose nearest class mode is `target`."""
    return float((nearest_mode(features, modes) == target).mean())


def mode_coverage(hits_per_class: list[float], threshold: float = 0.5) -> float:
    """Fraction of classes covered: a class counts when more than `threshold` of its samples
    land nearest its own mode (so a sampler collapsing two prompts onto one mode loses one)."""
    hits = np.asarray(hits_per_class, dtype=np.float64)
    return float((hits > threshold).mean())


def onset_agreement(video_event: np.ndarray, audio_onset: np.ndarray, expected_onset, tolerance: float) -> float:
    """Fraction of samples whose audio onset lies within `tolerance` audio frames of the onset
    the world's rule ties to the (estimated) video event frame; expected_onset maps event -> onset."""
    expected = expected_onset(np.asarray(video_event, dtype=np.float64))
    return float((np.abs(np.asarray(audio_onset, dtype=np.float64) - expected) <= tolerance).mean())


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs of rows (a diversity measure)."""
    x = np.asarray(features, dtype=np.float64)
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples")
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    n = x.shape[0]
    return float(d[np.triu_indices(n, k=1)].mean())


def diversity_ratio(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean pairwise distance of the samples over the truth's: 1 is right, < 1 collapse, > 1 spread."""
    return mean_pairwise_distance(features) / mean_pairwise_distance(reference)
