"""A wheel install carries everything the tracer needs, under the tcplife_trace package only."""
import os
import re
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
    # every module of the package's own subpackages (frames/, ...) is there: one missing from
    # pyproject's `packages` would install without them
    for sub in sorted(os.listdir(os.path.join(ROOT, "tcplife_trace"))):
        d = os.path.join(ROOT, "tcplife_trace", sub)
        if os.path.isdir(d) and not os.path.islink(d) and os.path.exists(os.path.join(d, "__init__.py")):
            for mod in os.listdir(d):
                if mod.endswith(".py"):
                    assert f"tcplife_trace/{sub}/{mod}" in names
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


# -- scripts/provision.sh: the command on PATH, man page, completions, --uninstall ---------------
# These run the real script as root against a scratch prefix (it writes $PREFIX/sbin and
# $PREFIX/share instead of /usr/local) and this checkout's venv, which it finds provisioned.
PROVISION = os.path.join(ROOT, "scripts", "provision.sh")
VENV = os.path.dirname(os.path.dirname(sys.executable))


def provision(tmp_path, *args, path=None, user=None):
    env = {**os.environ, "TCPLIFE_TRACE_PREFIX": str(tmp_path / "usr"), "TCPLIFE_TRACE_VENV": VENV,
           "TCPLIFE_TRACE_UNIT_DIR": str(tmp_path / "units"), "TCPLIFE_TRACE_MANIFEST": str(tmp_path / "manifest")}
    if path is not None:
        env["PATH"] = path
    cmd = [PROVISION, *args] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}",
                                                   "--clear-groups", PROVISION, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def tree(root):
    out = {}
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


MADE = {"sbin/tcplife-trace", "share/man/man8/tcplife-trace.8", "share/bash-completion/completions/tcplife-trace",
        "share/zsh/site-functions/_tcplife-trace", "share/fish/vendor_completions.d/tcplife-trace.fish"}


@pytest.mark.privileged
def test_provision_puts_the_command_on_path_twice_the_same_and_uninstall_removes_it(tmp_path):
    r = provision(tmp_path)
    assert r.returncode == 0, r.stderr
    usr = tmp_path / "usr"
    first = tree(usr)
    assert set(first) == MADE
    assert first["sbin/tcplife-trace"] == os.path.join(VENV, "bin", "tcplife-trace")
    # the link runs the tool (sudo's secure_path and root's PATH hold /usr/local/sbin)
    v = subprocess.run([str(usr / "sbin" / "tcplife-trace"), "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and "0.1.0" in v.stdout
    manifest = (tmp_path / "manifest").read_text()
    again = provision(tmp_path)
    assert again.returncode == 0 and again.stderr == ""  # nothing to do, nothing said
    assert tree(usr) == first and (tmp_path / "manifest").read_text() == manifest
    # completion: click's own protocol, answered by the venv's command (no PATH needed)
    comp = subprocess.run(["bash", "-c", f"source {usr}/share/bash-completion/completions/tcplife-trace; "
                           "COMP_WORDS=(tcplife-trace ser); COMP_CWORD=1; _tcplife_trace_completion tcplife-trace;"
                           " echo ${COMPREPLY[@]}"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert comp.stdout.split() == ["serve"], comp.stderr
    u = provision(tmp_path, "--uninstall")
    assert u.returncode == 0, u.stderr
    assert tree(usr) == {} and not (tmp_path / "manifest").exists()
    assert os.path.exists(sys.executable)  # the venv was there before: not ours to remove
    assert provision(tmp_path, "--uninstall").stderr.count("\n") == 1  # "nothing to undo"


@pytest.mark.privileged
def test_provision_leaves_foreign_files_alone(tmp_path):
    usr = tmp_path / "usr"
    (usr / "sbin").mkdir(parents=True)
    (usr / "share" / "man" / "man8").mkdir(parents=True)
    (usr / "sbin" / "tcplife-trace").write_text("#!/bin/sh\necho the user's own\n")
    (usr / "share" / "man" / "man8" / "tcplife-trace.8").write_text(".TH MINE 8\n")
    r = provision(tmp_path)
    assert r.returncode == 0
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and all("left alone" in ln for ln in lines), r.stderr
    assert (usr / "sbin" / "tcplife-trace").read_text() == "#!/bin/sh\necho the user's own\n"
    assert (usr / "share" / "man" / "man8" / "tcplife-trace.8").read_text() == ".TH MINE 8\n"
    provision(tmp_path, "--uninstall")
    assert set(tree(usr)) == {"sbin/tcplife-trace", "share/man/man8/tcplife-trace.8"}  # still the user's


@pytest.mark.privileged
def test_provision_without_root_or_apt_is_one_line(tmp_path):
    r = provision(tmp_path, user=65534)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "run as root" in r.stderr
    assert not (tmp_path / "usr").exists()
    # no apt-get (nor dpkg) on PATH: it goes on when bcc, venv and gcc are there ...
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for name in os.listdir(d) if os.path.isdir(d) else ():
            if not name.startswith(("apt", "dpkg")) and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(os.path.join(d, name))
    r = provision(tmp_path, path=str(bin_dir))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "usr" / "sbin" / "tcplife-trace").is_symlink()
    provision(tmp_path, "--uninstall")
    # ... and says in one line what to install when one of them is missing
    for cc in ("gcc", "cc"):
        (bin_dir / cc).unlink(missing_ok=True)
    r = provision(tmp_path, path=str(bin_dir))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "provision: no apt-get here; install by hand: gcc (then run this again)"], r.stderr
    r = provision(tmp_path, "--bogus")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


# -- the man page and the help -------------------------------------------------------------------

def test_man_page_says_what_the_help_says():
    import click

    from tcplife_trace import manpage
    from tcplife_trace.cli import cli

    page = manpage.render()
    text = page.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")
    ctx = click.Context(cli, info_name="tcplife-trace")
    commands = [(cli, ctx)] + [(cli.get_command(ctx, n), click.Context(cli.get_command(ctx, n), info_name=n,
                                                                        parent=ctx)) for n in cli.list_commands(ctx)]
    checked = 0
    for cmd, c in commands:
        for p in cmd.get_params(c):
            rec = p.get_help_record(c)
            if rec:
                assert rec[0] in text and " ".join(rec[1].split()) in text, rec
                checked += 1
        assert " ".join(cmd.help.split("\n\n")[0].split()) in " ".join(text.split()), cmd.name
    assert checked > 50
    for n in cli.list_commands(ctx):
        assert f".SH COMMAND: {n.upper()}" in page
    assert "tcplife-trace serve --metrics-port 9470" in text  # the examples section
    # it renders: groff is man-db's formatter (no warnings, every section there)
    r = subprocess.run(["man", "--warnings", "-l", "-"], input=page, capture_output=True, text=True,
                       env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "0"}, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    shown = re.sub(".\b", "", r.stdout)  # overstrike bold
    assert "COMMAND: SERVE" in shown and "EXAMPLES" in shown and "--metrics-port PORT" in shown


def test_help_lists_every_threshold_and_examples():
    from tcplife_trace.analysis.leaks import Thresholds
    from tcplife_trace.cli import main
    r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    listed = r.stdout.split("thresholds (--threshold NAME=VALUE):")[1].split()
    assert listed == Thresholds.names()
    examples = r.stdout.split("examples:")[1].split("thresholds")[0]
    # every example parses (click accepts its flags): run each one's parser, not the trace
    for line in examples.strip().splitlines():
        argv = line.split("#")[0].split(">")[0].split()[1:]
        assert argv == [] or main([*argv, "--help"]) == 0, line


@pytest.mark.privileged
def test_wheel_in_a_fresh_venv_traces_with_the_distributions_bcc(wheel, tmp_path):
    """pip or pipx into a venv of its own: no --system-site-packages, bcc found by probes/bcc_import.py."""
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # the dependencies (click, pandas, ...) from this venv, as a .pth: PyPI is not the point here
    import sysconfig
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import bcc"], capture_output=True, timeout=60)
    assert r.returncode != 0  # bcc is not importable there on its own ...
    r = subprocess.run([str(venv / "bin" / "tcplife-trace"), "--duration", "1", "--poll-interval", "0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # ... and the tool traces all the same
    assert "tracing TCP state changes" in r.stderr and "events:" in r.stderr
