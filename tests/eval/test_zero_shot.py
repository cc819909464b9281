"""Zero-shot top-1 and class-level recall@1 on hand-made embeddings whose answers are known."""
import numpy as np
import pytest

from embedjax.eval.zero_shot import class_prototypes, top1_class_hits


def test_prototypes_are_the_renormalised_mean_of_unit_templates():
    # class 0: templates (3, 0) and (0, 1) -> unit (1, 0), (0, 1) -> mean (.5, .5) -> (1, 1)/sqrt 2;
    # an unnormalised mean would lean to (3, 1).
    text_ctd = np.array([[[3.0, 0.0], [0.0, 1.0]], [[-2.0, 0.0], [-1.0, 0.0]]])
    want = np.array([[1.0, 1.0], [-np.sqrt(2), 0.0]]) / np.sqrt(2)
    np.testing.assert_allclose(class_prototypes(text_ctd), want, rtol=1e-6)


def test_top1_class_hits_counts_any_key_of_the_right_class():
    keys = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # captions: two of class 7, one of class 3
    key_class = np.array([7, 7, 3])
    queries = np.array([[5.0, 1.0],   # nearest key 1 (class 7): hit
                        [0.1, 2.0],   # nearest key 2 (class 3): miss for class 7
                        [0.2, 1.0]])  # nearest key 2 (class 3): hit
    np.testing.assert_array_equal(top1_class_hits(queries, keys, [7, 7, 3], key_class), [1.0, 0.0, 1.0])
    # Cosine, not dot product: a long key does not win by its length.
    np.testing.assert_array_equal(top1_class_hits([[1.0, 0.05]], [[10.0, 10.0], [1.0, 0.0]], [1], [0, 1]), [1.0])
    # Item ids as classes: the exact item must win; ties go to the lower key index.
    np.testing.assert_array_equal(top1_class_hits([[1.0, 0.0]], [[1.0, 0.0], [2.0, 0.0]], [1], [0, 1]), [0.0])


def test_random_features_score_near_chance():
    rng = np.random.default_rng(0)
    protos = class_prototypes(rng.normal(size=(10, 4, 32)))
    labels = rng.integers(0, 10, 4000)
    hits = top1_class_hits(rng.normal(size=(4000, 32)), protos, labels, np.arange(10))
    assert abs(hits.mean() - 0.1) < 0.02  # 5 binomial standard errors (0.0047 each)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="classes, templates, dim"):
        class_prototypes(np.ones((3, 4)))
    with pytest.raises(ValueError, match="zero or non-finite"):
        top1_class_hits(np.zeros((1, 2)), np.ones((2, 2)), [0], [0, 1])
    with pytest.raises(ValueError, match="same D"):
        top1_class_hits(np.ones((1, 2)), np.ones((2, 3)), [0], [0, 1])
    with pytest.raises(ValueError, match="one class per"):
        top1_class_hits(np.ones((1, 2)), np.ones((2, 2)), [0], [0])
