"""Quantize a 16-bit GGUF with llama.cpp's own quantizer, in-process through llama-cpp-python (no build).

k-quants, i-quants and the rest: every type llama.cpp's `llama-quantize` makes, optionally guided by
an importance matrix (fasttune.calibrate).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fasttune import UserError, cpu_threads
from fasttune.convert import DIRECT_TYPES

logger = logging.getLogger(__name__)

# Types under ~4 bits per weight, made only with an importance matrix (fasttune.calibrate): llama.cpp
# refuses iq1_*, iq2_*, iq3_xxs and q2_k_s without one outright, the others lose far more without it.
NEEDS_IMATRIX = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
                 "iq4_nl", "iq4_xs", "q2_k", "q2_k_s"}


TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]", re.MULTILINE)  # llama.cpp's per-tensor line: "[  12/ 290] blk.0..."


def llama_ftype(name: str) -> int:
    """llama.cpp's LLAMA_FTYPE_MOSTLY_<NAME> for a quant name like 'q4_k_m'."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if value is None:
        known = sorted(DIRECT_TYPES) + sorted(
            k.removeprefix("LLAMA_FTYPE_MOSTLY_").lower() for k in dir(llama_cpp) if k.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise UserError(f"unknown quant type '{name}'; known: {', '.join(dict.fromkeys(known))}")
    return value


def ggml_type(name: str) -> int:
    """ggml's GGML_TYPE_<NAME> for a tensor type like 'q8_0' (one tensor's type, not a file's mix)."""
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        raise UserError(f"unknown tensor type '{name}'")
    return value


def check_quant_name(name: str, calibrated: bool = False) -> None:
    if name in NEEDS_IMATRIX and not calibrated:
        raise UserError(f"quant type '{name}' needs an importance matrix: llama.cpp rounds so few bits well only where "
                        "it knows which weights matter; export with --imatrix true (calibrates on the run's training "
                        "texts), or choose q3_k_m or larger")
    if name not in DIRECT_TYPES:
        llama_ftype(name)


@contextlib.contextmanager
def _native_output_captured():
    """Send llama.cpp's C-level stdout/stderr (a line per tensor) to a temp file, and Python's too:
    llama-cpp-python's log callback prints llama.cpp's lines to sys.stderr, which need not be fd 2
    (pytest's capture). Yields (a reader of what was written so far, a text stream to the real
    stderr for a progress bar meanwhile).

    Written by hand because neither llama-cpp-python nor llama.cpp offers a quantizer without console output.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with (tempfile.TemporaryFile(mode="w+b") as sink, os.fdopen(os.dup(saved[1]), "w") as console,
              open(sink.fileno(), "w", buffering=1, closefd=False) as text):
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                    yield (lambda: os.pread(sink.fileno(), os.fstat(sink.fileno()).st_size, 0).decode(
                        errors="replace"), console)
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _run_with_progress(call, log, console, desc: str) -> int:
    """Run `call` (a llama.cpp function: ctypes lets go of the GIL) in a thread and show its progress,
    read from the `[ i/ n] tensor ...` lines llama.cpp writes per tensor: a 7B's i-quant takes minutes.
    An exception in the call is raised here; Ctrl-C waits for the call to end (llama.cpp cannot be
    stopped, and the files it writes must not be taken away under it)."""
    result = {}

    def work():
        try:
            result["rc"] = call()
        except BaseException as error:  # handed to the caller's thread
            result["error"] = error

    worker = threading.Thread(target=work)
    worker.start()
    try:
        with tqdm(desc=desc, unit="tensor", file=console, leave=False) as bar:
            while True:
                worker.join(0.5)
                seen = TENSOR_LINE.findall(log())
                if seen:
                    bar.total = int(seen[-1][1])
                    bar.update(int(seen[-1][0]) - bar.n)
                if not worker.is_alive():
                    bar.refresh()  # the last read shown, n/n, however short the call
                    break
    finally:
        worker.join()
    if "error" in result:
        raise result["error"]
    return result["rc"]


def quantize(src: str | Path, out_path: str | Path, qtype: str, threads: int | None = None,
             imatrix: dict[str, np.ndarray] | None = None, overrides: dict[str, str] | None = None) -> Path:
    """k-quants and the rest, in-process through llama-cpp-python's bundled llama.cpp (no build).

    imatrix: GGUF tensor name -> mean squared input per channel (fasttune.calibrate), handed to
    llama.cpp as its `llama_model_imatrix_data` array (ended by a NULL name).
    overrides: GGUF tensor name -> the type that tensor gets instead, handed to llama.cpp as its
    `llama_model_tensor_override` array (`llama-quantize --tensor-type`; ended by a NULL pattern): what
    fasttune.mix's files are checked against (tests/test_mix.py)."""
    import llama_cpp

    check_quant_name(qtype, calibrated=imatrix is not None)
    src, out_path = Path(src), Path(out_path)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(qtype)
    params.nthread = threads or cpu_threads()
    if imatrix is not None:
        arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]  # alive until return
        entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
        for entry, name, values in zip(entries, imatrix, arrays):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if overrides:
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()  # alive until return
        for entry, (name, type_name) in zip(table, overrides.items()):
            entry.pattern = f"^{re.escape(name)}$".encode()  # llama.cpp matches with std::regex_search
            entry.type = ggml_type(type_name)
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    tmp = out_path.with_name(out_path.name + ".partial")
    # llama-cpp-python passes llama.cpp's lines on only at this logger's level, which a verbose=False
    # load leaves at ERROR: without them, no progress and no failure tail
    native = logging.getLogger("llama-cpp-python")
    level = native.level
    try:
        native.setLevel(logging.DEBUG)
        with _native_output_captured() as (captured, console):
            rc = _run_with_progress(
                lambda: llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)),
                captured, console, f"quantizing {out_path.name}")
            native_log = captured()
        if rc != 0 and re.search(r"no space left|file too large|disk quota", native_log, re.IGNORECASE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_path))
        if rc != 0:
            tail = "\n".join(native_log.splitlines()[-5:])
            raise RuntimeError(f"llama_model_quantize({src.name} -> {qtype}) failed with code {rc}:\n{tail}")
        os.replace(tmp, out_path)
    finally:
        native.setLevel(level)
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%.1f MB)", out_path, out_path.stat().st_size / 1e6)
    return out_path
