"""Compile the kernels for a GPU target on a machine without one.

The CPU tests run every kernel in Triton's interpreter, which executes the
kernel body as Python: it skips the compiler's checks, so a kernel can pass
them all and still fail to build on a GPU. (One did: a helper returning
float32 in one constexpr branch and uint8 in the other compiles on the
interpreter only.) Triton compiles ahead of time without a device, so:

1. :func:`recording_launches` notes, while the interpreter runs, each launch's
   kernel and the type of every argument (tensor dtype, int, float, None) and
   its compile options;
2. :func:`compile_launches` builds each distinct one for a CUDA architecture
   (default sm_90, the H100/H200), in a fresh process with the interpreter
   off, since ``triton.jit`` chooses between the two when a kernel is defined.

Used by ``tests/test_compile_check.py``; needs nothing but triton's bundled ptxas.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys

from plait.launches import triton_runs_replaced

#: launch keywords that are compile options, not kernel arguments
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")


def _describe(value):
    """An argument as JSON: a tensor by dtype, a scalar by value, None as None."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float)):
        return {"value": value}
    raise TypeError(f"a kernel argument of type {type(value).__name__} is not described")


@contextlib.contextmanager
def recording_launches():
    """Inside: every interpreted kernel launch is run as usual and noted in the
    yielded list as ``{"module", "kernel", "args", "options"}``."""
    launches: list[dict] = []

    def recording(run, kernel, *args, grid, warmup, **kwargs):
        named = dict(zip(kernel.arg_names, args))
        named.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
        launches.append({"module": kernel.fn.__module__, "kernel": kernel.fn.__name__,
                         "args": {k: _describe(v) for k, v in named.items()},
                         "options": {k: kwargs[k] for k in _OPTIONS if k in kwargs}})
        return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

    with triton_runs_replaced(recording):
        yield launches


#: torch dtype name -> Triton pointer element type
_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "uint8": "u8",
                 "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1"}


def _compile_one(launch: dict, arch: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        if param.name not in launch["args"]:
            raise ValueError(f"{launch['kernel']}: no recorded value for {param.name}")
        arg = launch["args"][param.name]
        value = arg.get("value")
        if param.is_constexpr or ("value" in arg and value is None):
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
        elif "tensor" in arg:
            signature[param.name] = "*" + _TRITON_TYPES[arg["tensor"]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    source = ASTSource(kernel, signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])


def compile_launches(launches: list[dict], arch: int = 90) -> list[str]:
    """Compile each distinct launch for ``sm_<arch>`` in a subprocess; returns
    one ``"kernel: error"`` line per launch that failed (empty: all built)."""
    distinct = list({json.dumps(launch, sort_keys=True): launch for launch in launches}.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", __name__, str(arch)], input=json.dumps(distinct), env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the compile process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main() -> None:
    arch = int(sys.argv[1])
    failures = []
    for launch in json.loads(sys.stdin.read()):
        try:
            _compile_one(launch, arch)
        except Exception as exc:  # every kernel gets its verdict, not only the first
            cause = exc
            while cause.__cause__ is not None:  # Triton wraps the reason in a CompilationError
                cause = cause.__cause__
            failures.append(f"{launch['kernel']}({', '.join(f'{k}={v}' for k, v in launch['args'].items())}): "
                            f"{type(cause).__name__}: {cause}\n{str(exc)[-1500:]}")
    print(json.dumps(failures))


if __name__ == "__main__":
    _main()
