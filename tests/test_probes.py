"""The standard readouts against independent references on the same folds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from latentmap import metrics, probes


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), [30, 20, 10])  # unequal classes: balanced accuracy differs
    points = rng.normal(size=(60, 12)) + 1.2 * np.eye(12)[labels] * rng.uniform(0.5, 3, (60, 1))
    return points, labels


def test_linear_probe_equals_a_plain_scikit_learn_pipeline_on_the_same_folds(data):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    points, labels = data
    ours = probes.per_image(points, labels, folds=5, seed=2, distance="cosine", weighted_k=20, temperature=0.07)
    reference = make_pipeline(StandardScaler(), LogisticRegressionCV(
        cv=StratifiedKFold(3, shuffle=True, random_state=2), **probes.probe_options()))
    predicted = cross_val_predict(reference, points, labels, cv=StratifiedKFold(5, shuffle=True, random_state=2))
    np.testing.assert_array_equal(ours["probe_acc"], predicted == labels)
    assert ours["probe_balanced_acc"].mean() == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-12)
    assert ours["probe_acc"].mean() >= 0.75  # well above chance (1/3): the classes are nearly separable


def _dino_reference(points, labels, k, temperature, folds, seed):
    """DINO's voting rule written out: cosine similarity on L2-normalised features, the k most
    similar training images each add exp(similarity / T) to their class."""
    from sklearn.model_selection import StratifiedKFold

    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    predicted = np.empty_like(labels)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(points, labels):
        for i in test:
            similarity = unit[train] @ unit[i]
            top = np.argsort(-similarity)[:k]
            votes = np.zeros(labels.max() + 1)
            for j in top:
                votes[labels[train][j]] += np.exp(similarity[j] / temperature)
            predicted[i] = votes.argmax()
    return predicted


def test_weighted_knn_equals_dinos_voting_rule(data):
    points, labels = data
    for k, temperature in ((20, 0.07), (5, 0.5), (100, 0.07)):  # k above the training fold: all of it
        ours = probes.weighted_knn_predictions(points, labels, k, temperature, folds=5, seed=2, block=7)
        np.testing.assert_array_equal(ours, _dino_reference(points, labels, k, temperature, 5, 2))


def test_weighted_knn_votes_survive_large_euclidean_distances(data):
    """exp(-d / 0.07) underflows to 0 for distances above ~50: the votes are scaled per row first,
    so euclidean weighted k-NN still finds the classes (an unscaled vote would say class 0 always)."""
    points, labels = data
    far = points * 1000.0  # the same neighbours, distances in the thousands
    predicted = probes.weighted_knn_predictions(far, labels, 20, 0.07, folds=5, seed=2, distance="euclidean")
    assert (predicted == labels).mean() > 0.6 and len(np.unique(predicted)) == 3
    # At these distances only each image's nearest neighbour still carries weight: it is 1-NN.
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    one_nn = cross_val_predict(KNeighborsClassifier(1), far, labels,
                               cv=StratifiedKFold(5, shuffle=True, random_state=2))
    np.testing.assert_array_equal(predicted, one_nn)


def test_readouts_rank_structure_above_shuffled_labels(data):
    points, labels = data
    shuffled = np.random.default_rng(0).permutation(labels)
    real = probes.per_image(points, labels, 5, 2, "cosine", 20, 0.07)
    null = probes.per_image(points, shuffled, 5, 2, "cosine", 20, 0.07)
    for name in probes.NAMES:
        assert real[name].mean() > null[name].mean() + 0.3, name


def test_balanced_weights_average_correctness_to_balanced_accuracy():
    labels = np.array([0, 0, 0, 1])
    correct = np.array([1.0, 1.0, 1.0, 0.0])  # class 0 all right, class 1 all wrong
    assert (correct * probes.balanced_weights(labels)).mean() == pytest.approx(0.5)


def test_the_probe_metrics_are_the_probes_names():
    assert metrics.PROBE_METRICS == probes.NAMES


def test_with_more_dimensions_than_images_the_probe_fits_in_the_training_span():
    """The representer theorem behind the speed-up: an L2-penalised logistic regression fitted on
    the training rows' span gives the same decision function as on the full space, and the probe's
    predictions agree with a plain scikit-learn pipeline (up to the solvers' stopping tolerance)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(3), 20)
    points = rng.normal(size=(60, 400)) + 0.4 * rng.normal(size=(3, 400))[labels]  # 400 dims, 60 images
    scaled = StandardScaler().fit_transform(points)
    _, _, basis = np.linalg.svd(scaled, full_matrices=False)
    full = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(scaled, labels)
    span = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(scaled @ basis.T, labels)
    test = StandardScaler().fit(points).transform(rng.normal(size=(10, 400)))
    np.testing.assert_allclose(span.decision_function(test @ basis.T), full.decision_function(test), atol=1e-5)

    ours = probes.linear_probe_predictions(points, labels, folds=5, seed=1)
    plain = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegressionCV(
        cv=StratifiedKFold(3, shuffle=True, random_state=1), **probes.probe_options())), points, labels,
        cv=StratifiedKFold(5, shuffle=True, random_state=1))
    assert (ours == plain).mean() >= 0.95 and (ours == labels).mean() > 0.6


def test_a_fold_whose_training_rows_are_one_point_predicts_as_the_same_point_in_few_dimensions():
    """Training rows all one point leave no direction in their span (the probe failed on 0 features):
    the probe then predicts by its intercept, as it does when the same rows have fewer dimensions
    than images (standardised to zeros), the majority class of each training fold."""
    labels = np.repeat(np.arange(2), [14, 6])
    wide, narrow = np.ones((20, 50)), np.ones((20, 5))  # 50 dims > 16 training rows; 5 < 16
    ours = probes.linear_probe_predictions(wide, labels, folds=5, seed=0)
    np.testing.assert_array_equal(ours, probes.linear_probe_predictions(narrow, labels, folds=5, seed=0))
    assert (ours == 0).all()  # the majority class of every training fold


def test_the_probes_standardiser_is_bit_equal_to_standard_scaler():
    """probes._standardiser against StandardScaler itself: the same mean, scale and standardised
    features to the last bit, near-constant columns included."""
    from sklearn.preprocessing import StandardScaler

    from latentmap.probes import _standardiser

    rng = np.random.default_rng(0)
    wide = rng.normal(size=(500, 64)) * rng.uniform(0, 5, 64) + rng.normal(0, 100, 64)
    constant = np.c_[rng.normal(size=(50, 3)), np.full((50, 2), 3.3), np.zeros((50, 1))]
    for x in (wide, constant, rng.integers(0, 3, (100, 5)).astype(np.float64)):
        scaler = StandardScaler().fit(x)
        mean, scale = _standardiser(x)
        assert np.array_equal(mean, scaler.mean_) and np.array_equal(scale, scaler.scale_)
        assert np.array_equal((x - mean) / scale, scaler.transform(x))


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_the_probes_log_loss_scorer_is_scikit_learns_to_the_last_bit(classes):
    """probes.neg_log_loss against the ``"neg_log_loss"`` scorer inside LogisticRegressionCV: the same
    score for every C and inner fold (bit-equal), so the same C is chosen; with 5 classes, one has 2
    images, so one of the 3 inner test folds lacks it (scikit-learn scores it over every class
    since 1.9)."""
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    if classes == 5 and tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 9):
        pytest.skip("scikit-learn before 1.9 scores a fold over its own classes only")
    rng = np.random.default_rng(classes)
    sizes = [12] * (classes - 1) + [2 if classes == 5 else 12]
    labels = np.repeat(np.arange(classes), sizes)
    points = rng.normal(size=(len(labels), 6)) + 0.8 * rng.normal(size=(classes, 6))[labels]
    if classes == 5:  # the premise: an inner test fold without the small class
        with warnings.catch_warnings():  # "only 2 members": the point
            warnings.simplefilter("ignore", UserWarning)
            inner = list(StratifiedKFold(3, shuffle=True, random_state=0).split(points, labels))
        assert any(4 not in labels[test] for _, test in inner)
    fitted = {}
    for name, scoring in (("sklearn", "neg_log_loss"), ("ours", probes.neg_log_loss)):
        head = LogisticRegressionCV(cv=StratifiedKFold(3, shuffle=True, random_state=0),
                                    **{**probes.probe_options(), "scoring": scoring})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted[name] = head.fit(points, labels)
    ours, reference = fitted["ours"].scores_, fitted["sklearn"].scores_  # a dict by class in older versions
    ours, reference = (list(s.values()) if isinstance(s, dict) else [s] for s in (ours, reference))
    assert np.asarray(reference).size >= 21 and np.array_equal(np.asarray(ours), np.asarray(reference))
    assert np.ravel(fitted["ours"].C_)[0] == np.ravel(fitted["sklearn"].C_)[0]


def _stub(proba: np.ndarray, classes: np.ndarray):
    """A fitted classifier whose predict_proba returns ``proba``."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Stub(ClassifierMixin, BaseEstimator):
        def predict_proba(self, x):
            return proba

    stub = Stub()
    stub.classes_ = classes
    return stub


@pytest.mark.parametrize("classes", [2, 4])
def test_the_log_loss_scorer_on_edge_probabilities_equals_log_loss(classes):
    """probes.neg_log_loss against scikit-learn's scorer with every class as labels, on 5,000 rows
    that include exact 0 and 1, values below eps and a class absent from y: bit-equal (a log that
    differed in its last bit anywhere would show in the mean)."""
    from sklearn.metrics import log_loss, make_scorer

    rng = np.random.default_rng(classes)
    proba = rng.dirichlet(np.full(classes, 0.3), size=5000)
    proba[:50] = np.eye(classes)[rng.integers(0, classes, 50)]  # exact 0 and 1
    proba[50:100, 0] = 1e-18
    proba[50:100] /= proba[50:100].sum(axis=1, keepdims=True)
    if classes == 2:  # a binary classifier's columns are [1 - p, p]
        proba[:, 0] = 1 - proba[:, 1]
    names = np.arange(classes) * 10
    y = names[rng.integers(0, classes - 1 if classes > 2 else classes, 5000)]  # 4 classes: the last never
    reference = make_scorer(log_loss, response_method="predict_proba", greater_is_better=False,
                            labels=names)(_stub(proba, names), np.zeros((5000, 1)), y)
    ours = probes.neg_log_loss(_stub(proba, names), np.zeros((5000, 1)), y)
    assert ours == reference and np.isfinite(ours) and ours < 0


def test_the_folds_in_threads_fit_what_one_after_another_fits(data, monkeypatch):
    """linear_probe_fit with its folds in threads (forced: from 0 numbers on) gives the same
    predictions, chosen Cs and probabilities as one fold after another, and leaves the process's
    warnings filters as they were."""
    points, labels = data
    probes.linear_probe_fit(points[:60], labels[:60], folds=2, seed=2)  # imports done: their filters are not ours
    found = {}
    for threshold in (10**12, 0):
        monkeypatch.setattr(probes, "PARALLEL_REFITS_FROM", threshold)
        filters = list(warnings.filters)
        found[threshold] = probes.linear_probe_fit(points, labels, folds=5, seed=2)
        assert warnings.filters == filters
    alone, threaded = found[10**12], found[0]
    assert np.array_equal(alone.predicted, threaded.predicted) and alone.chosen == threaded.chosen
    assert np.array_equal(alone.probabilities, threaded.probabilities) and len(alone.chosen) == 5
    assert (alone.predicted == labels).mean() >= 0.75


def test_fits_stopped_at_the_iteration_limit_are_counted_in_one_line_not_warned(data, monkeypatch, caplog):
    """With a limit of 2 lbfgs iterations every inner fit stops early: the probe says how many in
    one log line (their n_iter_: 5 folds x 3 inner folds x 7 Cs), shows no ConvergenceWarning, and
    leaves the warnings filters as they were."""
    from sklearn.exceptions import ConvergenceWarning

    points, labels = data
    probes.linear_probe_fit(points, labels, folds=5, seed=2)  # imports done: their filters are not ours
    monkeypatch.setattr(probes, "MAX_ITER", 2)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        probes.linear_probe_fit(points, labels, folds=5, seed=2)
    assert not [w for w in shown if issubclass(w.category, ConvergenceWarning)]
    assert warnings.filters == filters
    said = [r.getMessage() for r in caplog.records if "stopped at 2 iterations" in r.getMessage()]
    assert said == ["linear probe: 105 logistic-regression fits stopped at 2 iterations before converging "
                    "(tolerance 1e-3)"]
