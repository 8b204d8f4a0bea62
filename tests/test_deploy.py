"""deploy/: every file rendered and checked with the real tools (kubectl's kustomize, the Kubernetes
schemas, systemd-analyze, the compose specification), and every command line in it parsed by
Tandem's own argument parser. A missing tool fails the test (scripts/setup.sh installs them)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tandem.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OVERLAYS = ["cpu", "production"]
K8S_VERSION = "1.30.0"
ROLES = ("coordinator", "prefill", "decode")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} is not installed: scripts/setup.sh installs it (deploy/ cannot be checked without it)"
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    """Tandem's own parser on a command line from deploy/: an unknown flag or a bad value fails."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            raise AssertionError(f"tandem {' '.join(argv)}: {err.getvalue().strip()}") from None


def flag_envs(role: str) -> set[str]:
    """TANDEM_* names of a subcommand's flags (each flag has one: --kv-cache-gib is TANDEM_KV_CACHE_GIB)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = set()
    for action in sub.choices[role]._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                out.add("TANDEM_" + opt[2:].upper().replace("-", "_"))
    return out


def check_env(names: set[str], role: str | None, where: str) -> None:
    known = flag_envs(role) if role else set().union(*(flag_envs(r) for r in ROLES))
    unknown = {n for n in names if n.startswith("TANDEM_")} - known
    assert not unknown, f"{where}: {sorted(unknown)} name no flag of tandem {role or '|'.join(ROLES)}"


# Kubernetes ------------------------------------------------------------------
def render(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "deprecated" not in out.stderr.lower(), out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def handlers(probe: dict) -> list[str]:
    return [k for k in ("exec", "grpc", "httpGet", "tcpSocket") if k in probe]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_overlays_render_and_validate_against_the_schemas(overlay: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", f"tandem-{r}") for r in ROLES} <= kinds and ("StatefulSet", "tandem-etcd") in kinds
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises, naming the field
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tandem-config")
    check_env(set(config["data"]), None, "ConfigMap tandem-config")
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = d["spec"]["template"]
        name = d["metadata"]["name"]
        for c in pod["spec"]["containers"]:
            where = f"{overlay}: {name}/{c['name']}"
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
            for p in ("livenessProbe", "readinessProbe"):
                assert len(handlers(c[p])) == 1, f"{where}: {p} needs exactly one handler, has {handlers(c[p])}"
            if c["image"].startswith("tandem"):
                role = c["args"][0]
                args = parse(c["args"])
                check_env({e["name"] for e in c.get("env", [])}, role, where)
                ports = {p["containerPort"] for p in c["ports"]}
                ann = pod["metadata"]["annotations"]
                assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) in ports, where
                for p in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if p in c and "exec" in c[p]:
                        probe = c[p]["exec"]["command"]
                        assert probe[0] == "tandem", where
                        ns = parse(probe[1:])
                        assert ns.target.endswith(f":{args.grpc_port}"), f"{where}: {p} probes another port"
                    elif p in c and "grpc" in c[p]:
                        assert c[p]["grpc"]["port"] == args.grpc_port, f"{where}: {p} probes another port"
                if role in ("prefill", "decode"):
                    env = {e["name"]: e.get("value") for e in c["env"]}
                    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["TANDEM_DRAIN_GRACE_S"]) + 10
                    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
                    assert shm["emptyDir"]["medium"] == "Memory"
                    assert float(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) > float(env["TANDEM_KVSTORE_RAM_GIB"])
                    assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]), where
                    assert any(e["name"] == "TANDEM_HOST" and e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
                               for e in c["env"]), f"{where}: a node must advertise its pod IP"
    if overlay == "production":
        for r in ROLES:
            env = {e["name"] for d in docs if d["metadata"]["name"] == f"tandem-{r}" and d["kind"] == "Deployment"
                   for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert {"TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA"} <= env, r
            assert ("TANDEM_KV_SECRET_FILE" in env) == (r != "coordinator")
            assert ("TANDEM_API_KEYS_FILE" in env) == (r == "coordinator")


def test_kustomize_and_the_schemas_catch_a_broken_manifest(tmp_path: Path) -> None:
    """The checks above can fail: a misspelt field does not pass the strict schema."""
    import kubernetes_validate

    doc = next(d for d in render("cpu") if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag"):
        parse(["prefill", "--no-such-flag"])


# systemd ---------------------------------------------------------------------
def test_systemd_units_verify_and_their_command_lines_parse(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.stem for u in units} == {"tandem-etcd", *(f"tandem-{r}" for r in ROLES)}
    # A root of its own: the executables the units name, and systemd's own units beside ours.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for u in units:
        shutil.copy(u, root / "etc/systemd/system" / u.name)
        exec_start = next(line for line in u.read_text().splitlines() if line.startswith("ExecStart="))
        argv = exec_start.removeprefix("ExecStart=").split()
        exe = root / argv[0].lstrip("/")
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        if argv[0].endswith("/tandem"):
            parse(argv[1:])
    out = subprocess.run([analyze, "verify", f"--root={root}", *(str(root / "etc/systemd/system" / u.name)
                                                                 for u in units)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
    for env_file in (DEPLOY / "systemd").glob("*.env.example"):
        names = {line.split("=", 1)[0] for line in env_file.read_text().splitlines()
                 if line.strip() and not line.startswith("#")}
        role = env_file.name.split(".")[0]
        check_env(names, role if role in ROLES else None, env_file.name)


# compose ---------------------------------------------------------------------
def test_compose_file_matches_the_compose_spec_and_its_commands_parse() -> None:
    path = DEPLOY / "compose" / "compose.yaml"
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = yaml.safe_load(path.read_text())
    for name, svc in doc["services"].items():
        if not str(svc.get("image", "")).startswith("tandem"):
            continue
        args = parse(svc["command"])
        check_env(set(svc.get("environment", {})), svc["command"][0], f"compose {name}")
        health = svc["healthcheck"]["test"]
        assert health[:2] == ["CMD", "tandem"], name
        assert parse(health[2:]).target.endswith(f":{args.grpc_port}"), name


def test_the_image_copies_every_package_the_project_declares() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM ") and "ENTRYPOINT [\"tandem\"]" in text
    assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.M), "the image must not run as root"
    copied = set(re.findall(r"^COPY (\S+) \./\1$", text, re.M))
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    dirs = set(re.findall(r'"tandem(?:\.\w+)?" = "(\w+)"', pyproject))
    assert dirs and dirs <= copied, f"the Dockerfile does not copy {sorted(dirs - copied)}"
