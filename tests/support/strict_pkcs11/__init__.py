"""The strict-HSM test module: a PKCS#11 library (strict_pkcs11.c, built here with gcc) that
forwards to SoftHSM2 but behaves like the strictest cloud HSMs (its own GCM IVs written into
``pIv``, caller IVs refused if configured, no ``C_CopyObject``, optional latency, outages switched
on and off at run time through a control file). See the C file's header for every knob.

Use::

    strict = build(directory)                      # compile once per directory
    os.environ.update(strict.environ(iv="refuse"))  # read by the module at C_Initialize
    settings: [hsm] module = str(strict.library)    # same token, same PIN as SoftHSM
    strict.fail("CKR_TOKEN_NOT_PRESENT")            # every call fails from now on …
    strict.clear()                                  # … until this
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from keybroker.devenv import softhsm_module

SOURCE = Path(__file__).with_name("strict_pkcs11.c")
IV_MODES = ("generate", "refuse", "keep", "ignore")


@dataclass(frozen=True)
class StrictModule:
    """A built strict module and the files that steer it."""

    library: Path
    """The module to configure as ``[hsm] module``."""
    target: Path
    """The SoftHSM copy it forwards to (a copy, so that a process that also loads SoftHSM
    directly gets two independent instances, like two processes)."""
    control: Path
    trace: Path

    def environ(
        self, *, iv: str = "generate", copy: str = "refuse", latency_us: int = 0
    ) -> dict[str, str]:
        """The environment the module reads at C_Initialize."""
        if iv not in IV_MODES or copy not in ("refuse", "allow"):
            raise ValueError(f"bad strict module option iv={iv!r} copy={copy!r}")
        return {
            "STRICT_PKCS11_TARGET": str(self.target),
            "STRICT_PKCS11_IV": iv,
            "STRICT_PKCS11_COPY": copy,
            "STRICT_PKCS11_LATENCY_US": str(latency_us),
            "STRICT_PKCS11_CONTROL": str(self.control),
            "STRICT_PKCS11_TRACE": str(self.trace),
        }

    def _write_control(self, text: str) -> None:
        staged = self.control.with_name(self.control.name + ".new")
        staged.write_text(text)
        staged.replace(self.control)  # a new inode: the module notices on its next call

    def fail(self, code: str, functions: Iterable[str] = ()) -> None:
        """From the next call on, answer ``code`` (e.g. ``CKR_DEVICE_REMOVED``) to every call
        but C_Initialize/C_Finalize/C_GetInfo/C_GetFunctionList, or only to ``functions``."""
        lines = [f"fail={code}"]
        names = list(functions)
        if names:
            lines.append("fail_functions=" + ",".join(names))
        self._write_control("\n".join(lines) + "\n")

    def set_latency(self, microseconds: int) -> None:
        """Sleep this long before forwarding each call (overrides the environment)."""
        self._write_control(f"latency_us={microseconds}\n")

    def clear(self) -> None:
        """End any outage or latency override switched on through the control file."""
        self.control.unlink(missing_ok=True)

    def trace_lines(self) -> list[str]:
        """Lines the module wrote: one per C_Initialize (with its flags) and per refusal."""
        try:
            return self.trace.read_text().splitlines()
        except FileNotFoundError:
            return []


def build(directory: Path) -> StrictModule:
    """Compile the module into ``directory`` (reused while the source is unchanged)."""
    directory.mkdir(parents=True, exist_ok=True)
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    library = directory / f"strict-pkcs11-{digest}.so"
    if not library.exists():
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("gcc is needed to build the strict PKCS#11 test module")
        staged = library.with_suffix(".tmp")
        subprocess.run(
            [
                gcc,
                "-shared",
                "-fPIC",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-fvisibility=hidden",
                "-o",
                str(staged),
                str(SOURCE),
                "-ldl",
                "-lpthread",
            ],
            check=True,
            capture_output=True,
        )
        staged.replace(library)
    target = directory / "softhsm2-for-strict.so"
    if not target.exists():
        staged_target = target.with_suffix(".tmp")
        shutil.copyfile(softhsm_module(), staged_target)
        staged_target.replace(target)
    return StrictModule(
        library=library,
        target=target,
        control=directory / f"control-{os.getpid()}",
        trace=directory / f"trace-{os.getpid()}",
    )
