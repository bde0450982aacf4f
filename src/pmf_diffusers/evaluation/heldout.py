# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Held-out evaluation of a class-conditional generator on small real images (e.g. scikit-learn's digits).

Everything is measured against **real** images in a **fixed** feature space, with models that do not come from this
project, so a good score cannot come from the generator grading itself:

* features: greyscale, area-downsampled to ``feature_size``² pixels in [0, 1] (8×8 for the digits: the data set's
  own resolution), and their projection on a PCA fitted on the real *training* split;
* **class fidelity**: accuracy of an RBF SVM (scikit-learn) fitted on the real training split only; its accuracy on
  the real held-out split is reported next to it;
* **precision / recall** (Kynkäänniemi et al. 2019, k-NN manifolds, :func:`~pmf_diffusers.evaluation.precision_recall`)
  of the samples against the real held-out split, in the PCA space; the same numbers for a real training subset of
  the same size and class mix are the real-vs-real reference;
* **Fréchet distance** in the PCA space between the samples and the held-out split, with its **floor**: the same
  distance for real training subsets of the same size and class mix (mean over ``floor_repeats`` subsets);
* **memorisation**: nearest-neighbour distances (pixel features) of each sample to the training split and to the
  held-out split, compared with what unseen real images give (see :meth:`HeldOutEvaluator.memorisation`).

Every number is reported overall and per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import DEFAULT_PR_NEIGHBORHOOD
from .metrics import feature_statistics, frechet_distance, precision_recall


__all__ = [
    "MEMORISATION_RATIO_THRESHOLD",
    "MEMORISATION_EXCESS_THRESHOLD",
    "HeldOutEvaluator",
    "pixel_features",
]

# A sample set is flagged as memorising when its nearest-neighbour distances to the training split, relative to the
# held-out split, fall below this fraction of what unseen real images give ...
MEMORISATION_RATIO_THRESHOLD = 0.8
# ... or when it has this many more near-copies of training images than of held-out images (see `memorisation`).
MEMORISATION_EXCESS_THRESHOLD = 0.05
# A "near copy" is closer to its nearest neighbour than this quantile of real unseen images' nearest-neighbour
# distances.
NEAR_COPY_QUANTILE = 0.05


def pixel_features(images, feature_size: int = 8) -> np.ndarray:
    """Greyscale images downsampled by area averaging to ``feature_size``², flattened: (N, feature_size²) in [0, 1].

    ``images``: uint8 arrays (N, H, W) / (N, H, W, C) in [0, 255], or float arrays / tensors (N, C, H, W) or (N, H, W)
    in [0, 1] (what ``PMFPipeline(..., output_type="pt")`` returns). H and W must be multiples of ``feature_size``.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        array = images.astype(np.float64) / 255.0
        if array.ndim == 4:  # (N, H, W, C)
            array = array.mean(axis=-1)
    else:
        array = images.astype(np.float64)
        if array.ndim == 4:  # (N, C, H, W)
            array = array.mean(axis=1)
    if array.ndim != 3:
        raise ValueError(f"Expected a batch of images (N, H, W[, C]) or (N, C, H, W), got shape {images.shape}.")
    num, height, width = array.shape
    if height % feature_size or width % feature_size:
        raise ValueError(f"Image size {height}×{width} is not a multiple of feature_size={feature_size}.")
    blocks = array.reshape(num, feature_size, height // feature_size, feature_size, width // feature_size)
    return blocks.mean(axis=(2, 4)).reshape(num, feature_size * feature_size).clip(0.0, 1.0)


def _nearest_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Euclidean distance from each query row to its nearest reference row."""
    distances = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(references).double())
    return distances.min(dim=1).values.numpy()


def _fd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


@dataclass
class _Split:
    pixels: np.ndarray
    projected: np.ndarray
    labels: np.ndarray


class HeldOutEvaluator:
    """Fit the fixed references on real images once, then score any number of sample sets.

    Args:
        train_images, train_labels: the real images the generator was trained on (fit the classifier and the PCA).
        heldout_images, heldout_labels: real images the generator never saw (the reference distribution).
        feature_size: side of the downsampled pixel features (8 for the digits).
        pca_components: dimension of the space of the Fréchet distance and of precision/recall.
        k: neighbourhood size of precision/recall.
        floor_repeats: real training subsets averaged for the Fréchet floor and the real precision/recall.
        seed: seed of the PCA, the classifier and the real subsets.

    Images are anything :func:`pixel_features` accepts.
    """

    def __init__(
        self,
        train_images,
        train_labels,
        heldout_images,
        heldout_labels,
        *,
        feature_size: int = 8,
        pca_components: int = 20,
        k: int = DEFAULT_PR_NEIGHBORHOOD,
        floor_repeats: int = 5,
        seed: int = 0,
    ):
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        self.feature_size = feature_size
        self.k = k
        self.floor_repeats = floor_repeats
        self.seed = seed
        train_pixels = pixel_features(train_images, feature_size)
        heldout_pixels = pixel_features(heldout_images, feature_size)
        self.pca = PCA(n_components=pca_components, random_state=seed).fit(train_pixels)
        self.classifier = SVC(C=10.0, gamma="scale", random_state=seed).fit(train_pixels, np.asarray(train_labels))
        self.train = _Split(train_pixels, self.pca.transform(train_pixels), np.asarray(train_labels))
        self.heldout = _Split(heldout_pixels, self.pca.transform(heldout_pixels), np.asarray(heldout_labels))
        self.classes = sorted(set(self.train.labels.tolist()))
        self.classifier_heldout_accuracy = float(
            (self.classifier.predict(heldout_pixels) == self.heldout.labels).mean()
        )
        # Real unseen images' nearest-neighbour distances: held-out → train and train → held-out.
        self._real_to_train = _nearest_distances(heldout_pixels, train_pixels)
        self._real_to_heldout = _nearest_distances(train_pixels, heldout_pixels)
        self._floor_cache: dict[tuple, dict] = {}

    # ---- real-vs-real references ----------------------------------------------------------------------------
    def _train_subset(self, counts: dict[int, int], repeat: int) -> np.ndarray:
        """Indices of a random training subset with ``counts[c]`` images of class c (seeded by ``repeat``)."""
        rng = np.random.default_rng([self.seed, repeat])
        chosen = []
        for class_id, count in sorted(counts.items()):
            pool = np.flatnonzero(self.train.labels == class_id)
            if count > len(pool):
                raise ValueError(
                    f"{count} samples of class {class_id} but only {len(pool)} real training images of it: "
                    "the real-vs-real floor needs at least as many real images as samples per class."
                )
            chosen.append(rng.choice(pool, size=count, replace=False))
        return np.concatenate(chosen)

    def real_reference(self, counts: dict[int, int]) -> dict:
        """Fréchet floor and precision/recall of real training subsets with these class counts vs the held-out split.

        Mean over ``floor_repeats`` subsets, overall and per class (what a perfect generator would score with this
        many samples).
        """
        key = tuple(sorted(counts.items()))
        if key not in self._floor_cache:
            runs = []
            for repeat in range(self.floor_repeats):
                subset = self._train_subset(counts, repeat)
                runs.append(self._distribution_scores(self.train.projected[subset], self.train.labels[subset]))
            self._floor_cache[key] = _mean_of_dicts(runs)
        return self._floor_cache[key]

    # ---- scores ------------------------------------------------------------------------------------------------
    def _distribution_scores(self, projected: np.ndarray, labels: np.ndarray) -> dict:
        """Fréchet distance and precision/recall of projected features vs the held-out split, overall and per class."""
        scores = {"fd": _fd(projected, self.heldout.projected)}
        scores.update(self._precision_recall(projected, self.heldout.projected))
        per_class = {}
        for class_id in self.classes:
            mine, real = projected[labels == class_id], self.heldout.projected[self.heldout.labels == class_id]
            if len(mine) < 2:
                continue
            entry = {"fd": _fd(mine, real)}
            entry.update(self._precision_recall(mine, real))
            per_class[class_id] = entry
        scores["per_class"] = per_class
        return scores

    def _precision_recall(self, samples: np.ndarray, real: np.ndarray) -> dict:
        if min(len(samples), len(real)) <= self.k:
            return {}
        result = precision_recall(torch.from_numpy(real), torch.from_numpy(samples), k=self.k)
        return {"precision": result["precision"], "recall": result["recall"]}

    def memorisation(self, pixels: np.ndarray) -> dict:
        """Nearest-neighbour test for copies of training images.

        Samples are compared with what real images the generator never saw give: held-out digits are to the
        training split what an honest sample is, and training digits are that to the held-out split (the two splits
        differ in size, hence these references rather than comparing raw distances). With ``d_train`` / ``d_heldout``
        the nearest-neighbour distances to each split,

        * ``ratio`` = [median d_train / median d_heldout](samples) ÷ the same ratio for real unseen images: ≈ 1 for
          a generator as novel as real data, → 0 when samples copy training images;
        * ``near_copy_excess`` = (share of samples closer to a training image than the 5 % quantile of real
          held-out → train distances) − (the same share towards the held-out split): ≈ 0 unless training images
          are reproduced; smooth or average-looking samples raise both shares alike.

        ``flagged`` when ``ratio`` < :data:`MEMORISATION_RATIO_THRESHOLD` or ``near_copy_excess`` >
        :data:`MEMORISATION_EXCESS_THRESHOLD`.
        """
        to_train = _nearest_distances(pixels, self.train.pixels)
        to_heldout = _nearest_distances(pixels, self.heldout.pixels)
        real_ratio = np.median(self._real_to_train) / np.median(self._real_to_heldout)
        ratio = float(np.median(to_train) / max(np.median(to_heldout), 1e-12) / real_ratio)
        near_train = float((to_train < np.quantile(self._real_to_train, NEAR_COPY_QUANTILE)).mean())
        near_heldout = float((to_heldout < np.quantile(self._real_to_heldout, NEAR_COPY_QUANTILE)).mean())
        excess = near_train - near_heldout
        return {
            "median_nn_to_train": float(np.median(to_train)),
            "median_nn_to_heldout": float(np.median(to_heldout)),
            "ratio": ratio,
            "near_copies_of_train": near_train,
            "near_copies_of_heldout": near_heldout,
            "near_copy_excess": excess,
            "flagged": bool(ratio < MEMORISATION_RATIO_THRESHOLD or excess > MEMORISATION_EXCESS_THRESHOLD),
        }

    def evaluate(self, sample_images, sample_labels) -> dict:
        """Score a sample set whose images were generated for ``sample_labels``; see the module docstring.

        Returns a dict: ``num_samples``, ``accuracy`` (classifier), ``classifier_heldout_accuracy`` (the classifier on
        real held-out images), ``precision``, ``recall``, ``fd``, ``fd_floor``, ``fd_ratio`` (fd / floor),
        ``real_precision`` / ``real_recall`` (real subsets of the same size), ``memorisation`` and ``per_class``
        (the same keys per class id, memorisation included).
        """
        labels = np.asarray(sample_labels)
        pixels = pixel_features(sample_images, self.feature_size)
        if len(pixels) != len(labels):
            raise ValueError(f"{len(pixels)} images but {len(labels)} labels.")
        counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
        unknown = set(counts) - set(self.classes)
        if unknown:
            raise ValueError(f"Sample labels {sorted(unknown)} are not classes of the real data {self.classes}.")
        correct = self.classifier.predict(pixels) == labels
        scores = self._distribution_scores(self.pca.transform(pixels), labels)
        floor = self.real_reference(counts)
        report = {
            "num_samples": int(len(labels)),
            "accuracy": float(correct.mean()),
            "classifier_heldout_accuracy": self.classifier_heldout_accuracy,
            **_summary(scores, floor),
            "memorisation": self.memorisation(pixels),
            "per_class": {},
        }
        for class_id, class_scores in scores["per_class"].items():
            mask = labels == class_id
            report["per_class"][class_id] = {
                "num_samples": int(mask.sum()),
                "accuracy": float(correct[mask].mean()),
                **_summary(class_scores, floor["per_class"][class_id]),
                "memorisation": self.memorisation(pixels[mask]),
            }
        return report


def _summary(scores: dict, floor: dict) -> dict:
    return {
        "precision": scores.get("precision"),
        "recall": scores.get("recall"),
        "real_precision": floor.get("precision"),
        "real_recall": floor.get("recall"),
        "fd": scores["fd"],
        "fd_floor": floor["fd"],
        "fd_ratio": scores["fd"] / max(floor["fd"], 1e-12),
    }


def _mean_of_dicts(dicts: list[dict]) -> dict:
    """Element-wise mean of equally shaped nested dicts of floats."""
    first = dicts[0]
    if isinstance(first, dict):
        return {key: _mean_of_dicts([d[key] for d in dicts]) for key in first if all(key in d for d in dicts)}
    return float(np.mean(dicts))
