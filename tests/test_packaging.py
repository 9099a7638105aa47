"""A wheel install carries everything the tracer needs, under the tcplife_trace package only."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), ROOT],
                   check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_is_namespaced_and_ships_the_bpf_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tcplife_trace"}  # no generic top-level `probes` or `analysis`
    for f in ("ebpf/tcplife.bpf.c", "ebpf/event.h", "ebpf/stubs/include/linux/types.h",
              "ebpf/stubs/include/asm/page.h", "ebpf/stubs/include/uapi/linux/bpf.h"):
        assert f"tcplife_trace/{f}" in names
    meta = [n for n in names if n.endswith("METADATA")][0]
    requires = [ln for ln in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if ln.startswith("Requires-Dist:")]
    assert not any(r.split()[1].lower() == "bcc" for r in requires)  # PyPI's bcc is unrelated


@pytest.mark.privileged
def test_installed_wheel_builds_the_program(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", "import sys; from tcplife_trace.cli import main; "
                        "import tcplife_trace.ebpf as e; print(e.EBPF_DIR); sys.exit(main(['--ebpf']))"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(target))
    assert "TRACEPOINT_PROBE(sock, inet_sock_set_state)" in r.stdout
