"""configs/ablations.py: every axis family expands, at both scales, into runs whose overrides resolve
against the family's config, with the axis's baseline first and two seeds per value."""
import pathlib

import pytest

from embedjax import sweep

FAMILY = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "ablations.py")

# axis -> (override key, expected values at small scale in sweep order)
EXPECTED_SMALL = {
    "pooling": ("model.pooling", ["mean", "cls", "lasttoken", "weightedmean"]),
    "loss": ("train.loss", ["infonce", "siglip", "cosent"]),
    "temperature": ("train.temperature", [0.05, 0.01, 0.02, 0.1]),
    "batch": ("train.batch_size", [32, 8, 128]),
    "hard_negatives": ("data.num_negatives", [0, 1]),
    "matryoshka": ("train.matryoshka_dims", [(), (8, 16, 32)]),
    "layer_dims": ("train.layer_dims", None),
}


@pytest.mark.parametrize("axis", sorted(EXPECTED_SMALL))
@pytest.mark.parametrize("scale", ["small", "full"])
def test_each_family_expands_and_resolves(axis, scale):
    spec = f"{FAMILY}:{axis}" + (",full" if scale == "full" else "")
    runs = sweep.expand(sweep.load_sweep(spec))
    sweep.check_overrides(spec, runs, [])  # every override names a real key with a valid value
    key, values = EXPECTED_SMALL[axis]
    seen = list(dict.fromkeys(r["overrides"][key] for r in runs))
    assert len(runs) == 2 * len(seen) and [r["overrides"]["seed"] for r in runs[:2]] == [0, 1]
    if scale == "small" and values is not None:
        assert seen == values


def test_layer_dim_family_compares_last_layer_2d_matryoshka_and_starbucks():
    runs = sweep.load_sweep(f"{FAMILY}:layer_dims")
    lists = list(dict.fromkeys(r["train.layer_dims"] for r in runs))
    last, two_d, starbucks = lists
    assert last == ((2, 32),)
    assert sorted(two_d) == sorted((layer, dim) for layer in (1, 2) for dim in (8, 16, 32))
    assert set(starbucks) < set(two_d) and (2, 32) in starbucks and len(starbucks) < len(two_d)


def test_unknown_axis_or_scale_is_refused():
    with pytest.raises(ValueError, match="AXIS or AXIS,full"):
        sweep.load_sweep(f"{FAMILY}:dropout")
    with pytest.raises(ValueError, match="AXIS or AXIS,full"):
        sweep.load_sweep(f"{FAMILY}:loss,huge")
