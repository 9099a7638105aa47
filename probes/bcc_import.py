"""Find the distribution's bcc (python3-bpfcc) from any interpreter or venv.

PyPI's `bcc` is an unrelated lattice library, so bcc is never a pip
dependency. The distro package is pure Python over ctypes (libbcc.so.0), so
loading its package directory works from an isolated venv without exposing
the rest of /usr/lib/python3/dist-packages.
"""
from __future__ import annotations

import importlib.util
import os
import sys

DIST_DIRS = (
    "/usr/lib/python3/dist-packages/bcc",
    "/usr/lib/python3/site-packages/bcc",
    "/usr/share/bcc/python/bcc",
)
HINT = ("install the distribution's bcc: `apt install python3-bpfcc` (Debian/Ubuntu), "
        "then run from a venv made with --system-site-packages or with ./run.sh")


class BccMissing(Exception):
    pass


def import_bcc():
    """The bcc module, from sys.path or the distribution's directory."""
    try:
        import bcc  # noqa: F401
        if hasattr(bcc, "BPF"):
            return bcc
        raise BccMissing(f"the `bcc` module at {bcc.__file__} is not iovisor bcc (PyPI's bcc is "
                         f"an unrelated package: pip uninstall bcc); {HINT}")
    except ImportError:
        pass
    for d in DIST_DIRS:
        init = os.path.join(d, "__init__.py")
        if os.path.exists(init):
            spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[d])
            module = importlib.util.module_from_spec(spec)
            sys.modules["bcc"] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # libbcc.so missing or broken
                del sys.modules["bcc"]
                raise BccMissing(f"bcc at {d} failed to load ({e}); {HINT}") from None
            return module
    raise BccMissing(f"bcc (iovisor BPF Compiler Collection) is not installed; {HINT}")
