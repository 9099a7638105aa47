"""What deploy/ ships, checked with the tools that consume it: Prometheus alert rules (promtool
check and unit tests), the Grafana dashboard (JSON, every query parsed by promtool and naming
only metrics a real `serve` exposes), the systemd unit (systemd-analyze verify), the container
and Kubernetes manifests (against a schema of the fields they use)."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from test_metrics import promtool, samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
RULES = os.path.join(DEPLOY, "prometheus", "tcplife-trace.rules.yml")
RULE_TESTS = os.path.join(DEPLOY, "prometheus", "tcplife-trace.rules.test.yml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "tcplife-trace.json")


def run(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# -- Prometheus rules -----------------------------------------------------------------------------

def test_alert_rules_are_valid_and_their_unit_tests_pass():
    r = run(promtool(), "check", "rules", RULES)
    assert r.returncode == 0 and "SUCCESS: 8 rules found" in r.stdout and r.stderr == "", r.stdout + r.stderr
    r = run(promtool(), "test", "rules", RULE_TESTS, cwd=os.path.dirname(RULE_TESTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    names = set(re.findall(r"alert: (\w+)", open(RULES).read()))
    tested = set(re.findall(r"alertname: (\w+)", open(RULE_TESTS).read()))
    assert names == tested  # every alert has a unit test that fires it


def test_rule_unit_tests_can_fail(tmp_path):
    # the same tests against rules whose CLOSE_WAIT threshold was changed: promtool says so
    broken = open(RULES).read().replace('tcplife_sockets{state="CLOSE_WAIT"} > 20', 'tcplife_sockets{state="CLOSE_WAIT"} > 2000')
    (tmp_path / "tcplife-trace.rules.yml").write_text(broken)
    (tmp_path / "t.yml").write_text(open(RULE_TESTS).read())
    r = run(promtool(), "test", "rules", "t.yml", cwd=tmp_path)
    assert r.returncode != 0 and "TcplifeCloseWaitGrowing" in r.stdout + r.stderr


# -- Grafana dashboard ----------------------------------------------------------------------------

def dashboard_exprs() -> list[str]:
    d = json.load(open(DASHBOARD))
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as a query would have them after interpolation."""
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")


def test_dashboard_is_grafana_json_and_every_query_parses(tmp_path):
    d = json.load(open(DASHBOARD))
    assert d["uid"] == "tcplife-trace" and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in d["panels"] if p["type"] == "row"}
    assert titles == {"TCP states", "Churn", "Findings", "Tracer health"}
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
    # promtool parses PromQL when it checks rules: every query as a recording rule
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": grafana_to_promql(e)} for i, e in enumerate(dashboard_exprs())]}]}
    f = tmp_path / "dash.rules.json"  # JSON is YAML
    f.write_text(json.dumps(rules))
    r = run(promtool(), "check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and a typo in one is caught
    rules["groups"][0]["rules"][0]["expr"] += " by"
    f.write_text(json.dumps(rules))
    assert run(promtool(), "check", "rules", str(f)).returncode != 0


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b((?:tcplife|process)_[a-z_]+)\b", text))


@pytest.mark.privileged
def test_rules_and_dashboard_name_only_metrics_serve_exposes():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = subprocess.Popen([sys.executable, "-m", "tcplife_trace.cli", "serve", "--metrics-port", str(port),
                              "--duration", "30", "--poll-interval", "1"], stderr=subprocess.PIPE, text=True)
    try:
        assert "metrics on http://127.0.0.1:" in agent.stderr.readline()
        deadline = time.monotonic() + 15
        while True:  # the first sock_diag look fills tcplife_sockets and the findings
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            if "tcplife_socket_poll_duration_seconds_count 0.0" not in text or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        agent.terminate()
        agent.wait(timeout=20)
    exposed = {name for name, _labels in samples(text)}
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    wanted = referenced_metrics(open(RULES).read()) | referenced_metrics(" ".join(dashboard_exprs()))
    # a gauge family with no series yet (no finding now) is still announced by its # TYPE line
    missing = {m for m in wanted if m not in exposed and m not in families}
    assert missing == set()
    assert len(wanted) >= 15


# -- systemd --------------------------------------------------------------------------------------
UNIT = os.path.join(DEPLOY, "tcplife-trace.service")
VENV_TOOL = os.path.join(os.path.dirname(sys.executable), "tcplife-trace")


def unit_capabilities(text: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("CapabilityBoundingSet=")]
    return line.split("=", 1)[1].split()


def verify(unit_path, man_dir):
    """systemd-analyze verify with the man page findable (Documentation=man:tcplife-trace(8))."""
    return run("systemd-analyze", "verify", str(unit_path), env={**os.environ, "MANPATH": str(man_dir)})


def test_unit_verifies_and_names_real_capabilities(tmp_path):
    man = tmp_path / "man" / "man8"
    man.mkdir(parents=True)
    from tcplife_trace import manpage
    (man / "tcplife-trace.8").write_text(manpage.render())
    text = open(UNIT).read()
    assert "ExecStart=/usr/local/sbin/tcplife-trace serve " in text  # what provision.sh links
    unit = tmp_path / "tcplife-trace.service"
    unit.write_text(text.replace("ExecStart=/usr/local/sbin/tcplife-trace ", f"ExecStart={VENV_TOOL} "))
    r = verify(unit, tmp_path / "man")
    assert r.returncode == 0 and r.stderr == "", r.stderr  # an unknown key is a warning: none
    # systemd ignores a capability it does not know: capsh knows them all
    caps = unit_capabilities(text)
    assert caps == ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
    for cap in caps:
        assert run("capsh", f"--explain={cap.lower()}").returncode == 0, cap
    for want in ("NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure", "RestartPreventExitStatus=2"):
        assert want in text.splitlines()
    # verify catches what it should: a misspelt key
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSystm="))
    assert "Unknown key 'ProtectSystm'" in verify(unit, tmp_path / "man").stderr


@pytest.mark.privileged
def test_provision_installs_the_unit_on_request_and_uninstall_removes_it(tmp_path):
    from test_packaging import provision
    r = provision(tmp_path, "--with-service")
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "units" / "tcplife-trace.service"
    text = unit.read_text()
    assert f"ExecStart={VENV_TOOL} serve $TCPLIFE_TRACE_ARGS" in text.splitlines()
    assert "generated by tcplife-trace scripts/provision.sh" in text.splitlines()[1]
    assert r.stderr.splitlines()[-1] == f"provision: installed {unit} (TCPLIFE_TRACE_UNIT_DIR: not enabled)"
    v = verify(unit, tmp_path / "usr" / "share" / "man")
    assert v.returncode == 0 and v.stderr == "", v.stderr
    assert "unit " + str(unit) in (tmp_path / "manifest").read_text().splitlines()
    provision(tmp_path, "--uninstall")
    assert not unit.exists()
    # a unit of the admin's own is left as it is
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    r = provision(tmp_path, "--with-service")
    assert f"{unit} exists and was not made by this script: left alone" in r.stderr
    assert unit.read_text() == "[Service]\nExecStart=/bin/true\n"
    provision(tmp_path, "--uninstall")
    assert unit.exists()


# The capabilities the unit grants, measured: the tracer and a look at every socket run under
# exactly that bounding set (root's uid, as in the unit); without CAP_SYS_ADMIN the other
# namespaces are not read (and said so), without CAP_SYS_PTRACE the owners of another user's
# sockets are unknown (and said so).
PROBE = """
import json
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import socket_snapshot
s = LiveSession()
for _ in range(3):
    s.poll(100)
snap = socket_snapshot.take()
s.stop()
mine = [x for x in snap.sockets if x.lport == PORT and x.state == 10]  # LISTEN
print(json.dumps({"found": len(mine), "owned": sum(1 for x in mine if snap.holders.get(x.inode)),
                  "errors": snap.errors, "received": s.report["events_received"]}))
"""


@pytest.mark.privileged
def test_the_units_capabilities_are_the_ones_needed(tmp_path):
    name = f"tltcaps{os.getpid()}"
    port = 7311
    subprocess.run(["ip", "netns", "add", name], check=True)
    listener = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        # a listener of another user (nobody) in a namespace of its own
        listener = subprocess.Popen(["ip", "netns", "exec", name, "setpriv", "--reuid=65534", "--regid=65534",
                                     "--clear-groups", "/usr/bin/python3", "-c",
                                     f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); "
                                     "s.listen(); print('up', flush=True); time.sleep(120)"],
                                    stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "up"
        caps = [c.lower().removeprefix("cap_") for c in unit_capabilities(open(UNIT).read())]

        def probe(capset):
            limit = [] if capset is None else ["setpriv", "--bounding-set=-all," + ",".join("+" + c for c in capset),
                                               "--inh-caps=-all", "--no-new-privs", "--"]
            r = run(*limit, sys.executable, "-c", PROBE.replace("PORT", str(port)), cwd=ROOT)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout.splitlines()[-1])

        root = probe(None)  # every capability: the baseline (a process no one may read is said so there too)
        full = probe(caps)
        assert full["found"] == 1 and full["owned"] == 1 and full["errors"] == root["errors"], (full, root)
        no_admin = probe([c for c in caps if c != "sys_admin"])
        assert no_admin["found"] == 0
        assert any(name in e and "setns failed" in e for e in no_admin["errors"]), no_admin
        no_ptrace = probe([c for c in caps if c != "sys_ptrace"])
        assert no_ptrace["found"] == 1 and no_ptrace["owned"] == 0
        assert any(e.startswith("owners:") for e in no_ptrace["errors"]), no_ptrace
        no_dac = probe([c for c in caps if c != "dac_read_search"])
        assert no_dac["found"] == 1 and no_dac["owned"] == 0
        assert any(e.startswith("owners:") for e in no_dac["errors"]), no_dac
        only_bpf = probe(["bpf", "perfmon"])
        assert only_bpf["received"] >= 0 and only_bpf["found"] == 0  # traces; this host's namespace only
        no_bpf = run("setpriv", "--bounding-set=-all,+sys_ptrace", "--inh-caps=-all", "--", VENV_TOOL,
                     "--duration", "1")
        assert no_bpf.returncode == 2 and "tracing needs root (or CAP_BPF and CAP_PERFMON)" in no_bpf.stderr
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "netns", "del", name])


# -- the journal ----------------------------------------------------------------------------------

def test_priorities_of_the_lines_it_writes():
    from tcplife_trace import journal
    assert journal.priority("tcplife-trace: error: cannot serve metrics on 127.0.0.1:9470") == 3
    assert journal.priority("tcplife-trace: warning: 12 events lost in the kernel") == 4
    assert journal.priority("tcplife-trace: notice: cannot set nice -5") == 5
    assert journal.priority("tcplife-trace: CRITICAL syn_flood: SYN flood on 0.0.0.0:80") == 2
    assert journal.priority("tcplife-trace: WARNING close_wait_leak: CLOSE_WAIT leak") == 4
    assert journal.priority("tcplife-trace: INFO new_listener: new listener") == 6
    assert journal.priority("tcplife-trace: 3.0 s traced, 6 connections seen") == 6


@pytest.mark.privileged
def test_serve_under_the_journal_gives_each_line_its_priority():
    """JOURNAL_STREAM names serve's stderr, as systemd sets it: lines get <N> prefixes; a
    CLOSE_WAIT leak made here is a warning (4), the start line and the summary info (6)."""
    rfd, wfd = os.pipe()
    st = os.fstat(wfd)
    with socket.socket() as probe_sock:
        probe_sock.bind(("127.0.0.1", 0))
        mport = probe_sock.getsockname()[1]
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    agent = subprocess.Popen([sys.executable, "-m", "tcplife_trace.cli", "serve", "--metrics-port", str(mport),
                              "--duration", "6", "--poll-interval", "1", "--threshold", "close_wait_age_s=1"],
                             stderr=wfd, env=env, cwd=ROOT)
    os.close(wfd)
    err = os.fdopen(rfd)
    first = err.readline()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    c.close()  # the peer closed; `a` is never closed while serve looks: CLOSE_WAIT
    try:
        rest = err.read()
        agent.wait(timeout=30)
    finally:
        a.close()
        srv.close()
    lines = [first] + rest.splitlines()
    assert first.startswith("<6>tcplife-trace: tracing TCP state changes"), first
    assert all(re.match(r"<[0-7]>", ln) for ln in lines), lines
    leak = [ln for ln in lines if "tcplife-trace: WARNING close_wait_leak" in ln]
    assert leak and all(ln.startswith("<4>") for ln in leak), lines
    assert any(ln.startswith("<6>tcplife-trace: ") and "traced" in ln for ln in lines)
    # the same serve on a plain pipe (no JOURNAL_STREAM for it): lines as they are
    r = run(sys.executable, "-m", "tcplife_trace.cli", "serve", "--metrics-port", str(mport), "--duration", "1",
            "--poll-interval", "0", env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, cwd=ROOT)
    assert r.returncode == 0 and r.stderr.startswith("tcplife-trace: tracing"), r.stderr


# -- recordings of many nodes (a DaemonSet's) to a Dask scheduler ------------------------------------

def test_a_wrong_scheduler_is_one_line_and_exit_2_within_seconds(tmp_path):
    from test_fleet import client, write
    d = tmp_path / "nodes"
    d.mkdir()
    for i, host in enumerate(("node1", "node2")):
        write(d / f"{host}.arrow", host, [r for g in range(2, 5) for r in client(g, g * 10)],
              1_800_000_000 * 10**9 + i)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    for address, says in ((dead, "Timed out trying to connect"), ("nonsense://x", "unknown address scheme"),
                          ("localhost", "missing port number")):
        t0 = time.monotonic()
        r = run(sys.executable, "-m", "tcplife_trace.cli", "analyze", "--engine", "dask", "--scheduler", address,
                str(d), cwd=ROOT)
        took = time.monotonic() - t0
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"tcplife-trace: error: cannot use the Dask scheduler {address}: ") and says in r.stderr
        assert took < 20, took  # was a 30 s connect timeout, then a traceback


# -- container image and Kubernetes --------------------------------------------------------------
# No container engine and no cluster here: the files are checked, not run. The Kubernetes
# objects are validated against the API's own schema as the `kubernetes` client's models carry
# it (pydantic, unknown fields forbidden, types and required fields checked); the
# ServiceMonitor (a CRD) against the few fields the Prometheus Operator needs. Not checked: that
# the image builds, that a kubelet admits the pod (PodSecurity, seccomp), that tracing works in it.
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
MANIFEST = os.path.join(DEPLOY, "kubernetes", "tcplife-trace.yaml")


def manifest_docs() -> dict:
    import yaml
    return {d["kind"]: d for d in yaml.safe_load_all(open(MANIFEST)) if d}


def k8s_model(kind: str):
    import kubernetes.client as k
    return {"Namespace": k.V1Namespace, "ServiceAccount": k.V1ServiceAccount, "DaemonSet": k.V1DaemonSet,
            "Service": k.V1Service}[kind]


def test_manifest_objects_match_the_kubernetes_schema():
    import pydantic
    docs = manifest_docs()
    assert set(docs) == {"Namespace", "ServiceAccount", "DaemonSet", "Service", "ServiceMonitor"}
    for kind in ("Namespace", "ServiceAccount", "DaemonSet", "Service"):
        k8s_model(kind).model_validate(docs[kind])
    # the check is real: a misspelt field, a wrong type and a missing required field all fail
    import copy
    ds = docs["DaemonSet"]
    for broken in (lambda d: d["spec"]["template"]["spec"].update(hostPid=True),
                   lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="x"),
                   lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name")):
        bad = copy.deepcopy(ds)
        broken(bad)
        with pytest.raises(pydantic.ValidationError):
            k8s_model("DaemonSet").model_validate(bad)


def test_daemonset_is_wired_as_the_tracer_needs():
    from tcplife_trace.cli import cli
    docs = manifest_docs()
    ds = docs["DaemonSet"]
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = spec["containers"]
    sc = c["securityContext"]
    unit_caps = [cap.removeprefix("CAP_") for cap in unit_capabilities(open(UNIT).read())]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": unit_caps}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["runAsUser"] == 0
    # the args are a serve command line our CLI accepts, and its port is the one exposed and scraped
    args = c["args"]
    assert args[0] == "serve"
    ctx = cli.get_command(None, "serve").make_context("serve", list(args[1:]))
    port = ctx.params["metrics_port"]
    assert ctx.params["metrics_addr"] == "0.0.0.0"
    assert c["ports"][0]["containerPort"] == port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": port}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"] for v in spec["volumes"]}
    assert set(mounts.values()) <= volumes and "/sys/kernel/tracing" in mounts and "/run/tcplife-trace" in mounts
    # the Service and the ServiceMonitor reach that port
    svc = docs["Service"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (sport,) = svc["spec"]["ports"]
    assert sport["targetPort"] == c["ports"][0]["name"] and sport["port"] == port
    sm = docs["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [sport["name"]]
    assert all(d["metadata"].get("namespace", "tcplife-trace") == "tcplife-trace" for d in docs.values())


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = open(DOCKERFILE).read().replace("\\\n", " ")
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerfile_installs_the_distributions_bcc_and_no_kernel_headers():
    import tomllib

    from tcplife_trace.cli import cli
    ins = dockerfile_instructions()
    known = {"FROM", "RUN", "COPY", "ENV", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {i for i, _ in ins} <= known
    assert ins[0] == ("FROM", "debian:12-slim")
    runs = " ".join(v for i, v in ins if i == "RUN")
    assert "python3-bpfcc" in runs and "linux-headers" not in runs
    # every source the package is built from is copied (the wheel's packages come from these dirs)
    pkg_dirs = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
                   ["package-dir"].values())
    copied = {src for i, v in ins if i == "COPY" for src in v.split()[:-1]}
    assert pkg_dirs | {"pyproject.toml", "README.md"} <= copied
    assert all(os.path.exists(os.path.join(ROOT, src)) for src in copied)
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    cmd = json.loads(dict(ins)["CMD"])
    assert entry == ["tcplife-trace"] and cmd[0] == "serve"
    ctx = cli.get_command(None, "serve").make_context("serve", cmd[1:])
    assert ctx.params["metrics_port"] == int(dict(ins)["EXPOSE"])
