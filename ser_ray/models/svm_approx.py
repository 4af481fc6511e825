"""The SVM baseline's large-corpus solver: a kernel approximation and a linear classifier, whose
cost grows linearly in clips (no Ray).

The exact kernel SVC (libsvm, :mod:`ser_ray.models.svm`) costs about n^1.7-1.9 in training clips
(docs/benchmarks.md, "scale"): 23k clips take about an hour for one variant on 2 cores, and
MSP-Podcast's 113k training clips days. Beyond a threshold of training clips
(:func:`choose_solver`) the baseline runs :class:`ApproxKernelClassifier` instead: the same
StandardScaler, then a Nystroem map of the same kernel (RBF or polynomial, same gamma; a
linear kernel needs none) onto ``n_components`` features, then ridge classifiers (least-squares
linear SVMs, solved in closed form: O(n m^2) for m components, no iterations to converge,
deterministic), one per pair of classes as libsvm's SVC pairs them: on the 5,760-clip scale
corpus one ridge per class (one-vs-rest) scored 5.5 UA points below the exact SVC in every
fold (docs/benchmarks.md, "scale"). Its grid search prunes hopeless configs early
(:func:`halving_search`: successive halving on growing subsets of the training clips, scored
on the same speaker-grouped inner folds), instead of fitting every config on every inner fold.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = np.concatenate([rng.normal(0, 1, (40, 4)), rng.normal(3, 1, (40, 4))])
>>> y = np.repeat([0, 1], 40)
>>> model = ApproxKernelClassifier(C=1.0, n_components=50).fit(X, y)
>>> float((model.predict(X) == y).mean()) > 0.9
True
>>> choose_solver("auto", n_train_clips=1_200, approx_min_clips=4_000)
'exact'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.experimental import enable_halving_search_cv  # noqa: F401 - makes the class importable
from sklearn.kernel_approximation import Nystroem
from sklearn.model_selection import HalvingGridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

#: ``--svm-solver``: by size (``auto``), always the kernel SVC, always the approximation.
SOLVERS = ("auto", "exact", "approx")
#: Training clips of an outer fold above which ``auto`` takes the approximation
#: (docs/benchmarks.md, "scale"): RAVDESS-size corpora (1,200 training clips) stay exact, with
#: today's figures; up to ~4k training clips the exact grid of a variant still finishes in about
#: three minutes on 2 quiet cores; beyond, its n^1.8 growth outruns the approximation, already
#: about 4x cheaper at 4,800 training clips.
APPROX_MIN_CLIPS = 4_000
#: Nystroem components: a fit of 19,200 clips takes about a second on one core (1,000: about
#: 3 s). Its UA against the exact SVC on the same large corpus is not measured yet.
N_COMPONENTS = 500
#: Successive halving: each round keeps the best third of the configs on three times the clips.
HALVING_FACTOR = 3
#: The first round's clips at least (per class) so that every inner fold sees every class.
MIN_CLIPS_PER_CLASS = 10
#: What the summary says of each solver.
DESCRIPTIONS = {
    "exact": "exact kernel SVC (libsvm), every config on every inner fold",
    "approx": "Nystroem kernel approximation ({n_components} components) + one-vs-one ridge "
    "classifiers (least-squares linear SVMs), successive halving over the grid (factor "
    "{factor}) on the inner speaker folds; probabilities calibrated on held-out speakers",
}


def choose_solver(solver: str, n_train_clips: int, approx_min_clips: int = APPROX_MIN_CLIPS) -> str:
    """``exact`` or ``approx``: ``solver`` itself unless ``auto``, which takes the approximation
    only when an outer fold trains on more than ``approx_min_clips`` clips (so RAVDESS-size
    corpora keep the exact SVC and today's results).

    >>> choose_solver("auto", 19_200, 4_000), choose_solver("exact", 19_200, 4_000)
    ('approx', 'exact')
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVM solver {solver!r}; choose one of {SOLVERS}")
    if solver != "auto":
        return solver
    return "approx" if n_train_clips > approx_min_clips else "exact"


def describe(solver: str, n_components: int = N_COMPONENTS) -> str:
    """One line saying what ``solver`` (``exact``/``approx``) ran."""
    return DESCRIPTIONS[solver].format(n_components=n_components, factor=HALVING_FACTOR)


class ApproxKernelClassifier(ClassifierMixin, BaseEstimator):
    """StandardScaler -> Nystroem(kernel, gamma) -> :class:`PairwiseRidgeClassifier` (one
    ridge classifier of ``alpha = 1 / (2 C)`` per pair of classes, SVC's multi-class rule).

    Takes the SVC's hyperparameters (``kernel``, ``C``, ``gamma`` with ``"scale"`` meaning
    1 / (n_features * X.var()) of the standardised features, as in ``SVC``, ``degree``,
    ``class_weight``) so one grid serves both solvers. ``alpha = 1 / (2 C)`` puts the ridge
    penalty where the SVM's is (C times the loss plus half the squared norm). Deterministic:
    the Nystroem landmarks are drawn with ``random_state``. Its matrix products run on one
    BLAS thread: on 2 shared cores, threaded BLAS on matrices this size made a fit of 4,800
    clips take 6 s instead of 0.3 s; the parallelism is the Tune trials'.
    """

    def __init__(
        self,
        kernel: str = "rbf",
        C: float = 1.0,  # noqa: N803 - scikit-learn's name
        gamma: str | float = "scale",
        degree: int = 3,
        class_weight: str | None = None,
        n_components: int = N_COMPONENTS,
        random_state: int = 0,
    ) -> None:
        self.kernel = kernel
        self.C = C
        self.gamma = gamma
        self.degree = degree
        self.class_weight = class_weight
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> ApproxKernelClassifier:
        with threadpool_limits(limits=1, user_api="blas"):
            self.pipeline_ = self._pipeline(X).fit(X, y)
        self.classes_ = self.pipeline_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def _pipeline(self, X: np.ndarray) -> Pipeline:
        """The unfitted steps, gamma ``"scale"`` resolved on ``X``'s standardised values."""
        scale = StandardScaler().fit(X)
        steps: list[tuple[str, Any]] = [("scale", scale)]
        if self.kernel != "linear":
            gamma = self.gamma
            if gamma == "scale":
                variance = float(scale.transform(X).var())
                gamma = 1.0 / (X.shape[1] * variance) if variance > 0 else 1.0
            nystroem = Nystroem(
                kernel=self.kernel,
                gamma=float(gamma),
                degree=int(self.degree),
                coef0=0.0,  # SVC's default for the polynomial kernel
                n_components=min(int(self.n_components), len(X)),
                random_state=self.random_state,
            )
            steps.append(("nystroem", nystroem))
        ridge = PairwiseRidgeClassifier(
            alpha=1.0 / (2.0 * float(self.C)), class_weight=self.class_weight
        )
        return Pipeline([*steps, ("ridge", ridge)])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        with threadpool_limits(limits=1, user_api="blas"):
            return self.pipeline_.decision_function(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        with threadpool_limits(limits=1, user_api="blas"):
            return self.pipeline_.predict(X)


class PairwiseRidgeClassifier(ClassifierMixin, BaseEstimator):
    """One ridge classifier per pair of classes, deciding by their votes: what
    ``OneVsOneClassifier(RidgeClassifier(alpha, class_weight=...))`` computes (the same
    coefficients, decision values and labels; ``"balanced"`` weights each pair's two classes
    by that pair's counts), at the cost of one-vs-rest.

    Each pair's weighted least-squares problem (targets -1 for the lower class, +1 for the
    higher; an unpenalised intercept) needs only its two classes' clip counts, feature sums and
    Gram matrices ``Z_c^T Z_c``, so those are computed once per class (O(n m^2) in all) and
    every pair costs an m x m solve; scikit-learn's one-vs-one fits each pair on its clips,
    about (K - 1) times the work for K classes (2.7x the one-vs-rest fit on 19,200 clips of
    8 classes, m = 500).
    """

    def __init__(self, alpha: float = 1.0, class_weight: str | None = None) -> None:
        self.alpha = alpha
        self.class_weight = class_weight

    def fit(self, Z: np.ndarray, y: np.ndarray) -> PairwiseRidgeClassifier:
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight={self.class_weight!r}: None or 'balanced'")
        self.classes_, codes = np.unique(y, return_inverse=True)
        Z = np.asarray(Z, dtype=np.float64)
        n = np.bincount(codes, minlength=len(self.classes_)).astype(np.float64)
        blocks = [Z[codes == c] for c in range(len(self.classes_))]  # one copy per class
        sums = np.stack([block.sum(axis=0) for block in blocks])
        grams = [block.T @ block for block in blocks]
        self.pairs_ = [
            (i, j) for i in range(len(self.classes_)) for j in range(i + 1, len(self.classes_))
        ]
        coef, intercept = [], []
        for i, j in self.pairs_:
            w_i, w_j = (
                ((n[i] + n[j]) / (2 * n[i]), (n[i] + n[j]) / (2 * n[j]))
                if self.class_weight == "balanced"
                else (1.0, 1.0)
            )
            total = w_i * n[i] + w_j * n[j]
            mean = (w_i * sums[i] + w_j * sums[j]) / total
            target_mean = (w_j * n[j] - w_i * n[i]) / total
            gram = w_i * grams[i] + w_j * grams[j] - total * np.outer(mean, mean)
            cross = w_j * sums[j] - w_i * sums[i] - total * target_mean * mean
            beta = np.linalg.solve(gram + self.alpha * np.eye(len(mean)), cross)
            coef.append(beta)
            intercept.append(target_mean - mean @ beta)
        self.coef_, self.intercept_ = np.array(coef), np.array(intercept)
        self.n_features_in_ = Z.shape[1]
        return self

    def decision_function(self, Z: np.ndarray) -> np.ndarray:
        """Votes plus confidences squashed below one vote (scikit-learn's one-vs-one rule);
        two classes: the one pair's decision value (positive: the second class)."""
        scores = np.asarray(Z, dtype=np.float64) @ self.coef_.T + self.intercept_
        if len(self.classes_) == 2:
            return scores[:, 0]
        votes = np.zeros((len(scores), len(self.classes_)))
        confidence = np.zeros_like(votes)
        for k, (i, j) in enumerate(self.pairs_):
            higher = scores[:, k] > 0
            votes[:, j] += higher
            votes[:, i] += ~higher
            confidence[:, i] -= scores[:, k]
            confidence[:, j] += scores[:, k]
        return votes + confidence / (3 * (np.abs(confidence) + 1))

    def predict(self, Z: np.ndarray) -> np.ndarray:
        decision = self.decision_function(Z)
        if decision.ndim == 1:
            return self.classes_[(decision > 0).astype(int)]
        return self.classes_[decision.argmax(axis=1)]


def halving_search(
    configs: Sequence[Mapping[str, Any]],
    X: np.ndarray,
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    scorer: Callable[..., float],
    n_components: int = N_COMPONENTS,
    seed: int = 0,
) -> tuple[list[tuple[dict[str, Any], float, float]], int]:
    """Successive halving over ``configs`` (SVC hyperparameters) with
    :class:`ApproxKernelClassifier` on the inner ``splits`` (speaker-grouped; each round
    subsamples clips inside every split, so no speaker crosses sides). Returns the last round's
    ``(config, mean score, std score)`` (the survivors, scored on the most clips) and the
    number of configs pruned before it.

    The first round's clips: the grid's all-clips budget divided down (``min_resources``
    "exhaust": the last round uses every training clip), but at least
    :data:`MIN_CLIPS_PER_CLASS` per class.
    """
    n_classes = len(np.unique(y))
    rounds = 1 + math.floor(math.log(max(len(configs), 1), HALVING_FACTOR))
    floor = MIN_CLIPS_PER_CLASS * n_classes
    min_resources = min(len(y), max(len(y) // HALVING_FACTOR ** (rounds - 1), floor))
    search = HalvingGridSearchCV(
        ApproxKernelClassifier(n_components=n_components, random_state=seed),
        [{k: [v] for k, v in c.items()} for c in configs],
        factor=HALVING_FACTOR,
        resource="n_samples",
        min_resources=min_resources,
        cv=list(splits),
        scoring=scorer,
        refit=False,
        error_score="raise",
        random_state=seed,
        n_jobs=1,  # a Tune trial's one CPU
    )
    with warnings.catch_warnings():  # a round of few clips may miss a class in a split
        warnings.simplefilter("ignore", UserWarning)
        search.fit(X, y)
    results = search.cv_results_
    last = results["iter"] == results["iter"].max()
    rows = [
        (dict(results["params"][i]), float(results["mean_test_score"][i]),
         float(results["std_test_score"][i]))
        for i in np.flatnonzero(last)
    ]  # fmt: skip
    return rows, len(configs) - len(rows)
