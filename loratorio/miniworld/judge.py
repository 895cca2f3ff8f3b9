"""The automatic judge: a small CNN trained on the generator's ground truth, one 3-way head per category."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratorio.miniworld.world import CATEGORIES, Attributes, Scene


class Judge(nn.Module):
    """Image (B, 3, 32, 32) in [0, 1] -> logits (B, categories, 3 values: generic/none, skill 1, skill 2).

    classes: values per category; a category with fewer than 3 (the strong regime's present/absent characters) gets
    −inf logits for the values it does not have, so every head keeps one shape and its argmax stays in range.
    """

    def __init__(self, width: int = 48, classes: Sequence[int] = (3,) * len(CATEGORIES)) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1)
        self.conv2 = nn.Conv2d(24, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.conv4 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, sum(self.classes))

    def features(self, img: Tensor) -> Tensor:
        """Pooled trunk features (B, width): also the space of the realism distance."""
        h = F.max_pool2d(F.relu(self.conv1(img * 2 - 1)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        # Max over positions: "is it anywhere in the picture" is what presence means.
        return F.relu(self.conv4(h)).amax(dim=(-2, -1))

    def forward(self, img: Tensor) -> Tensor:
        flat = self.head(self.features(img))
        if all(c == 3 for c in self.classes):
            return flat.view(-1, len(self.classes), 3)
        out = flat.new_full((flat.shape[0], len(self.classes), 3), float("-inf"))
        start = 0
        for i, c in enumerate(self.classes):
            out[:, i, :c] = flat[:, start:start + c]
            start += c
        return out


def targets(requested: Sequence[Attributes | Scene]) -> Tensor:
    """(B, categories) the judge's target value per category (0 = nothing requested there)."""
    return torch.tensor([a.as_tuple() if isinstance(a, Attributes) else a.labels() for a in requested])


def requested_present(logits: Tensor, requested: Sequence[Attributes | Scene]) -> Tensor:
    """(B, categories) bool: for each requested skill slot, whether the judge's top class is that skill."""
    want = targets(requested)
    return (logits.argmax(-1) == want) & (want > 0)


def composition_score(logits: Tensor, requested: Sequence[Attributes | Scene]) -> Tensor:
    """(B,) fraction of each image's requested skills that the judge finds (the composition score)."""
    want = targets(requested)
    return requested_present(logits, requested).sum(1) / (want > 0).sum(1).clamp_min(1)


def confidence(logits: Tensor) -> Tensor:
    """(B,) mean over categories of the judge's top-class probability: a realism proxy (1 on clean renders)."""
    return logits.softmax(-1).amax(-1).mean(-1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (n, d) and b (m, d), as FID does."""
    mu_a, mu_b = a.double().mean(0), b.double().mean(0)
    cov_a, cov_b = torch.cov(a.double().T), torch.cov(b.double().T)
    # tr sqrt(A B) via the symmetric form sqrt(A^½ B A^½); eigh keeps it real for PSD inputs.
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
