"""Sample-quality metrics.

- Maximum mean discrepancy with a sum of RBF kernels (Gretton et al. 2012), unbiased estimate:
  MMD^2 = E[k(x, x')] + E[k(y, y')] - 2 E[k(x, y)],  k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)),
  the within-set means taken over distinct pairs.
- Frechet distance between Gaussians fitted to features (Heusel et al. 2017, "FID"):
  d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}).
- Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of
  balls around its points with radius the distance to the k-th nearest neighbour in the set;
  precision is the share of generated points inside the real manifold, recall the share of real
  points inside the generated one.
- Mode coverage of a Gaussian mixture with known centres c_m and deviation sigma (Metz et al.
  2017): a sample is of high quality when within 3 sigma of its nearest centre; a mode is hit
  when at least a tenth of its fair share n / M of the samples are high-quality ones nearest it.
- Exact Wasserstein-1 distance between two sets of n equally weighted points: the optimal
  transport plan between uniform empirical measures is a permutation (Birkhoff), so
  W1 = min_pi 1/n sum_i |x_i - y_pi(i)|, found by the Hungarian algorithm
  (``scipy.optimize.linear_sum_assignment``); in 1D the sorted order is optimal,
  W1 = 1/n sum_i |x_(i) - y_(i)|.
- Retrieval recall@K: the share of queries with at least one positive among their K most
  similar items (ties broken against the query: an item scored equal to the best positive ranks
  above it).
- Linear-probe accuracy: a multinomial logistic regression fitted on frozen training features
  and scored on test features (the representation-learning yardstick of CPC and SimCLR).
"""

from __future__ import annotations

import torch

DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{name} needs two (N, D) tensors with the same D, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"{name} needs at least 2 samples in each set")


def mmd_rbf(x: torch.Tensor, y: torch.Tensor,
            bandwidths: tuple[float, ...] = DEFAULT_BANDWIDTHS) -> float:
    """Unbiased MMD^2 between samples x (N, D) and y (M, D) under a sum of RBF kernels."""
    _check_pair(x, y, "mmd_rbf")
    x, y = x.double(), y.double()
    h2 = 2 * torch.tensor(bandwidths, dtype=torch.float64) ** 2

    def kernel_mean(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
        d2 = torch.cdist(a, b).pow(2)
        k = torch.exp(-d2[..., None] / h2).sum(-1)
        if same:
            n = len(a)
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return float(kernel_mean(x, x, True) + kernel_mean(y, y, True) - 2 * kernel_mean(x, y, False))


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, sigma: float,
                  radius: float = 3.0) -> dict[str, float]:
    """Modes hit (of M) and the share of ``samples`` (N, D) within ``radius`` sigma of a centre
    of ``centers`` (M, D); see the module docstring."""
    _check_pair(samples, centers, "mode_coverage")
    distance, nearest = torch.cdist(samples.double(), centers.double()).min(1)
    good = distance <= radius * sigma
    counts = torch.bincount(nearest[good], minlength=len(centers))
    hit = counts >= max(1.0, 0.1 * len(samples) / len(centers))
    return {"modes_hit": int(hit.sum()), "modes": len(centers),
            "high_quality": float(good.double().mean())}


def wasserstein1_exact(x: torch.Tensor, y: torch.Tensor) -> float:
    """The exact W1 between two point sets of equal size, (N, D) each (or (N,) in 1D)."""
    if x.ndim == 1:
        x, y = x[:, None], y[:, None]
    _check_pair(x, y, "wasserstein1_exact")
    if len(x) != len(y):
        raise ValueError(f"wasserstein1_exact needs sets of equal size, got {len(x)} and "
                         f"{len(y)}")
    x, y = x.double(), y.double()
    if x.shape[1] == 1:
        return float((x.sort(0).values - y.sort(0).values).abs().mean())
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x, y)
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[torch.from_numpy(rows), torch.from_numpy(cols)].mean())


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    # Tr((S1^1/2 S2 S1^1/2)^1/2) from the eigenvalues of a symmetric PSD matrix: exact and
    # free of the complex round-off that a general matrix square root leaves.
    evals, evecs = torch.linalg.eigh(sigma1)
    root1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def frechet_distance_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    _check_pair(real, fake, "frechet_distance")
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features (N, D)."""
    _check_pair(real, fake, "precision_recall")
    if k >= min(len(real), len(fake)):
        raise ValueError(f"k={k} needs more than k samples in each set")
    real, fake = real.double(), fake.double()

    def radii(points: torch.Tensor) -> torch.Tensor:
        # k + 1 because each point is its own nearest neighbour at distance 0.
        return torch.cdist(points, points).kthvalue(k + 1, dim=1).values

    def coverage(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= r[None]).any(dim=1).double().mean())

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K of (Q, M) query-item similarities, ``positives`` (Q, M) bool marking the right
    items of each query (every query needs one)."""
    if similarity.dim() != 2 or positives.shape != similarity.shape:
        raise ValueError(f"recall_at_k needs (Q, M) similarities and positives of the same "
                         f"shape, got {tuple(similarity.shape)} and {tuple(positives.shape)}")
    if not positives.any(dim=1).all():
        raise ValueError("recall_at_k: every query needs at least one positive item")
    best_positive = similarity.masked_fill(~positives, float("-inf")).max(dim=1).values
    # The rank of the best positive: how many negatives score at least as high.
    rank = ((similarity >= best_positive[:, None]) & ~positives).sum(dim=1)
    return {k: float((rank < k).double().mean()) for k in ks}


def logistic_regression(x: torch.Tensor, y: torch.Tensor, c: float = 1.0,
                        max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (D, K), bias (K,)) of the multinomial logistic regression of labels ``y`` in
    0..K-1 on (N, D) features, minimising sklearn's  C sum_i CE_i + |W|^2 / 2  (bias not
    penalised) by full-batch L-BFGS in float64."""
    x = x.double()
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(weight.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        # Divided by C n: the same minimiser, on the scale of a mean cross-entropy.
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) \
            + weight.square().sum() / (2 * c * len(x))
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                          test_features: torch.Tensor, test_labels: torch.Tensor,
                          c: float = 1.0) -> float:
    """Test accuracy of ``logistic_regression`` on frozen features standardised with the
    training mean and (population) standard deviation."""
    if train_features.dim() != 2 or test_features.shape[1:] != train_features.shape[1:]:
        raise ValueError(f"linear probe needs (N, D) features of one width, got "
                         f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    x, x_test = train_features.double(), test_features.double()
    mean, std = x.mean(0), x.std(0, correction=0).clamp(min=1e-12)
    classes, y = torch.unique(train_labels, return_inverse=True)
    weight, bias = logistic_regression((x - mean) / std, y, c)
    predicted = classes[(((x_test - mean) / std) @ weight + bias).argmax(1)]
    return float((predicted == test_labels).double().mean())
