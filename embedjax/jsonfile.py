"""Reading the JSON files a model or adapter folder must hold, with errors that name the file."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def read_json_file(path: str | os.PathLike, *, missing: str) -> Any:
    """The parsed contents of ``path``.

    A missing file raises ``FileNotFoundError("{path} is missing: {missing}")`` (``missing`` says
    what needs the file); a file that does not parse raises ``ValueError`` naming it.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
