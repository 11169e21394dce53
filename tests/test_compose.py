"""Offline checks of the container setup: compose.yaml, Dockerfile, .dockerignore,
deploy/prometheus and deploy/grafana, against the Compose Specification schema
and against what the built binaries and the workspace actually provide.

There is no Docker engine on the machines that run this, so nothing here starts
a container. Instead each check compares the files with the truth they depend
on: the binaries' own `--help` (environment variables, defaults, the
`healthcheck` subcommand), `cargo metadata` (binary names, workspace members),
the binaries' dynamic libraries (`ldd`), and the metric names registered in the
services' source. Every check is a function returning a list of problems; the
`test_mutation_*` tests feed each one a broken copy to prove it can fail.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import threading
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA_FILE = ROOT / "tests" / "compose" / "compose-spec.schema.json"
SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"

# In compose.yaml, in the Dockerfile (as targets) and in the workspace (as
# binaries) these are one name each.
APP_SERVICES = ("order-svc", "notify-svc")
# Which environment variables carry which part of a service's wiring.
PORT_VARS = {"order-svc": ("GRPC_ADDR", "METRICS_ADDR"), "notify-svc": ("METRICS_ADDR",)}
TOPIC_VARS = {"order-svc": ("ORDERS_TOPIC",), "notify-svc": ("ORDERS_TOPIC", "DLQ_TOPIC")}
# The README scales notify-svc to 3: the orders topic needs at least that many partitions.
MIN_ORDERS_PARTITIONS = 3
OBSERVABILITY = "observability"
TARGET_DEBUG = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"


# --------------------------------------------------------------------------
# Loading the facts
# --------------------------------------------------------------------------


def load_compose() -> dict:
    with COMPOSE_FILE.open() as f:
        return yaml.safe_load(f)


@functools.cache
def compose_schema() -> dict:
    raw = SCHEMA_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256, (
        f"{SCHEMA_FILE} changed: update SCHEMA_SHA256 and tests/compose/README.md together"
    )
    return json.loads(raw)


@functools.cache
def binary(name: str) -> Path:
    """The debug build of a workspace binary (scripts/test.sh builds them first;
    a lone `pytest tests/test_compose.py` builds what is missing)."""
    path = TARGET_DEBUG / name
    if not path.exists():
        subprocess.run(["cargo", "build", "--locked", "--bin", name], cwd=ROOT, check=True)
    return path


@functools.cache
def help_text(name: str) -> str:
    out = subprocess.run(
        [str(binary(name)), "--help"], capture_output=True, text=True, check=True, env=clean_env()
    )
    return out.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any variable a service reads, so a
    developer's shell cannot change what the binaries report."""
    documented = set()
    for name in APP_SERVICES:
        path = TARGET_DEBUG / name
        if path.exists():
            out = subprocess.run([str(path), "--help"], capture_output=True, text=True, env={})
            documented |= set(parse_help(out.stdout))
    env = {k: v for k, v in os.environ.items() if k not in documented}
    env.update(extra)
    return env


_OPTION_HEADER = re.compile(r"^\s+(?:-\w, )?--[a-z0-9-]+", re.MULTILINE)


def parse_help(text: str) -> dict[str, str | None]:
    """`[env: NAME=]` of each option in clap's long help -> its `[default: ...]`."""
    documented: dict[str, str | None] = {}
    starts = [m.start() for m in _OPTION_HEADER.finditer(text)] + [len(text)]
    for begin, end in zip(starts, starts[1:]):
        block = text[begin:end]
        env = re.search(r"\[env: ([A-Z][A-Z0-9_]*)", block)
        if env:
            default = re.search(r"\[default: ([^\]]*)\]", block)
            documented[env.group(1)] = default.group(1) if default else None
    return documented


@functools.cache
def documented_env(name: str) -> dict[str, str | None]:
    documented = parse_help(help_text(name))
    assert documented, f"found no [env: ...] in `{name} --help`: has its format changed?"
    return documented


@functools.cache
def cargo_metadata() -> dict:
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@functools.cache
def workspace_bins() -> frozenset[str]:
    return frozenset(
        t["name"] for p in cargo_metadata()["packages"] for t in p["targets"] if "bin" in t["kind"]
    )


def environment(service: dict) -> dict[str, str]:
    """A service's `environment`, in either of the two Compose syntaxes."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict((item.split("=", 1) + [""])[:2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def effective_config(compose: dict, name: str) -> dict[str, str | None]:
    """What the binary in service `name` will run with: its documented defaults
    overridden by what compose.yaml sets."""
    config = dict(documented_env(name))
    config.update(environment(compose["services"][name]))
    return config


def addr_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def parse_ports(entries: list) -> list[tuple[str | None, int]]:
    """`ports` entries -> (published, container port) pairs; a published range
    stays a string such as "9091-9093"."""
    pairs = []
    for entry in entries or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            pairs.append((None if published is None else str(published), int(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        container = parts[-1]
        published = parts[-2] if len(parts) >= 2 else None
        if "-" in container:
            lo, hi = (int(p) for p in container.split("-"))
            pairs.extend((published, port) for port in range(lo, hi + 1))
        else:
            pairs.append((published, int(container)))
    return pairs


def init_services(compose: dict, name: str) -> list[str]:
    deps = compose["services"][name].get("depends_on") or {}
    if isinstance(deps, list):
        return []
    return [d for d, spec in deps.items() if spec.get("condition") == "service_completed_successfully"]


def broker_services(compose: dict, name: str) -> list[str]:
    deps = compose["services"][name].get("depends_on") or {}
    if isinstance(deps, list):
        return []
    return [d for d, spec in deps.items() if spec.get("condition") == "service_healthy"]


def advertised_listeners(kafka: dict) -> dict[str, str]:
    """Listener name -> host:port from KAFKA_ADVERTISED_LISTENERS."""
    raw = environment(kafka).get("KAFKA_ADVERTISED_LISTENERS", "")
    listeners = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        name, _, hostport = item.partition("://")
        listeners[name] = hostport
    return listeners


def command_text(service: dict) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if isinstance(value, list):
            parts.extend(str(v) for v in value)
        elif value is not None:
            parts.append(str(value))
    return "\n".join(parts)


def created_topics(service: dict) -> dict[str, dict]:
    """Topics a one-shot init service creates: name -> {partitions, if_not_exists, bootstrap}."""
    topics = {}
    for line in command_text(service).splitlines():
        if "kafka-topics" not in line or "--create" not in line:
            continue
        tokens = shlex.split(line)

        def value(flag: str) -> str | None:
            return tokens[tokens.index(flag) + 1] if flag in tokens else None

        topic = value("--topic")
        if topic:
            partitions = value("--partitions")
            topics[topic] = {
                "partitions": int(partitions) if partitions else None,
                "if_not_exists": "--if-not-exists" in tokens,
                "bootstrap": value("--bootstrap-server"),
            }
    return topics


# --------------------------------------------------------------------------
# Dockerfile parsing
# --------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            word, _, args = full.partition(" ")
            instructions.append((word.upper(), args.strip()))
    return instructions


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults and the stages: {name, base, instructions}."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for instr, args in dockerfile_instructions(text):
        if instr == "FROM":
            tokens = [t for t in args.split() if not t.startswith("--")]
            base = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), tokens[0]
            )
            name = tokens[2] if len(tokens) >= 3 and tokens[1].upper() == "AS" else str(len(stages))
            stages.append({"name": name, "base": base, "instructions": []})
        elif not stages and instr == "ARG":
            key, _, default = args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1]["instructions"].append((instr, args))
    return global_args, stages


def stage_chain(stages: list[dict], target: str) -> list[dict]:
    """The stage `target` and the stages it is built FROM, base first."""
    by_name = {s["name"]: s for s in stages}
    chain, name = [], target
    while name in by_name:
        chain.insert(0, by_name[name])
        name = by_name[name]["base"]
    return chain


def stage_user(chain: list[dict]) -> str | None:
    user = None
    for stage in chain:
        for instr, args in stage["instructions"]:
            if instr == "USER":
                user = args
    return user


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def installed_binaries(chain: list[dict], stages: list[dict]) -> dict[str, str]:
    """binary name -> absolute path, for files COPY --from a build stage put in the image."""
    names = {s["name"] for s in stages}
    found = {}
    for stage in chain:
        for instr, args in stage["instructions"]:
            if instr != "COPY":
                continue
            tokens = args.split()
            src_stage = next((t.split("=", 1)[1] for t in tokens if t.startswith("--from=")), None)
            paths = [t for t in tokens if not t.startswith("--")]
            if src_stage not in names or len(paths) < 2:
                continue
            dest = paths[-1]
            for src in paths[:-1]:
                base = posixpath.basename(src)
                found[base] = posixpath.join(dest, base) if dest.endswith("/") else dest
    return found


def apt_installed(chain: list[dict]) -> set[str]:
    packages = set()
    for stage in chain:
        for instr, args in stage["instructions"]:
            if instr == "RUN":
                for m in re.finditer(r"apt-get install((?:\s+[^&;|\s]+)+)", args):
                    packages |= {p for p in m.group(1).split() if not p.startswith("-")}
    return packages


# --------------------------------------------------------------------------
# .dockerignore matching (Docker's rules: leading "/" ignored, "**" spans
# directories, a matched directory excludes all beneath it, "!" re-includes)
# --------------------------------------------------------------------------


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = posixpath.normpath(raw[1:] if negate else raw).lstrip("/")
        regex = _glob_regex(pattern)
        if any(re.fullmatch(regex, p) for p in prefixes):
            result = not negate
    return result


# --------------------------------------------------------------------------
# Metrics: what the services register, what the dashboard queries
# --------------------------------------------------------------------------


def exported_metrics(source: str) -> dict[str, set[str]]:
    """Metric family -> the series names Prometheus sees, from a service's
    metrics.rs (prometheus-client appends `_total` to counters)."""
    fields = dict(re.findall(r"pub\s+(\w+)\s*:\s*([^\n]+?),?\s*$", source, re.MULTILINE))
    families = {}
    for name, field in re.findall(
        r'register\(\s*"(\w+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*metrics\.(\w+)\.clone\(\)', source
    ):
        kind = fields.get(field, "")
        if "Counter" in kind:
            families[name + "_total"] = {name + "_total"}
        elif "Histogram" in kind:
            families[name] = {name + s for s in ("_bucket", "_sum", "_count")}
        elif "Gauge" in kind:
            families[name] = {name}
        else:
            raise AssertionError(f"metric {name}: unknown type {kind!r} of field {field}")
    return families


@functools.cache
def service_metrics() -> dict[str, set[str]]:
    families: dict[str, set[str]] = {}
    for name in APP_SERVICES:
        source = (ROOT / name / "src" / "metrics.rs").read_text()
        found = exported_metrics(source)
        assert found, f"found no registry.register(...) in {name}/src/metrics.rs"
        families.update(found)
    return families


_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\boffset\s+-?[\w$]+", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    e = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?", "", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in _PROMQL_KEYWORDS:
            continue
        names.add(m.group())
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return exprs


def dashboard_datasource_uids(dashboard: dict) -> set[str]:
    uids = set()

    def walk(node):
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and "uid" in ds:
                uids.add(ds["uid"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    return uids


def volume_mounts(service: dict) -> list[tuple[Path, str]]:
    """Bind mounts of files in the repository: (host path, container path)."""
    mounts = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            source, target = v.get("source", ""), v.get("target", "")
        else:
            source, target = (str(v).split(":") + [""])[:2]
        if source.startswith("."):
            mounts.append((ROOT / source, target))
    return mounts


def mounted_host_path(service: dict, container_path: str) -> Path | None:
    """The repository file a container path of `service` comes from."""
    for host, target in volume_mounts(service):
        if container_path == target:
            return host
        if container_path.startswith(target.rstrip("/") + "/"):
            return host / container_path[len(target.rstrip("/")) + 1 :]
    return None


# --------------------------------------------------------------------------
# The checks: each returns a list of problems (empty = fine)
# --------------------------------------------------------------------------


def check_schema(compose: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(compose_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(compose)
    ]


def check_env_documented(compose: dict) -> list[str]:
    problems = []
    for name in APP_SERVICES:
        service = compose["services"].get(name)
        if service is None:
            problems.append(f"compose.yaml has no service {name}")
            continue
        if "env_file" in service:
            problems.append(f"{name}: env_file hides configuration; set `environment` instead")
        documented = documented_env(name)
        for var in environment(service):
            if var not in documented:
                problems.append(f"{name}: {var} is not an environment variable `{name} --help` documents")
    return problems


def check_ports(compose: dict) -> list[str]:
    problems = []
    for name in APP_SERVICES:
        service = compose["services"][name]
        config = effective_config(compose, name)
        wanted = {addr_port(config[var]) for var in PORT_VARS[name]}
        ports = parse_ports(service.get("ports"))
        targets = {target for _, target in ports} | {int(str(p).split("/")[0]) for p in service.get("expose") or []}
        for target in targets - wanted:
            problems.append(f"{name}: port {target} is published/exposed but the service listens on {sorted(wanted)}")
        if name == "order-svc":
            for port in wanted - {t for _, t in ports}:
                problems.append(f"{name}: port {port} ({PORT_VARS[name]}) is not published")
        if name == "notify-svc":
            # Scalable: replicas must not fight over a name or a host port.
            if "container_name" in service:
                problems.append(f"{name}: container_name prevents --scale")
            for published, target in ports:
                if published is not None and "-" not in published:
                    problems.append(f"{name}: fixed host port {published}:{target} prevents --scale")
            if not targets & wanted:
                problems.append(f"{name}: metrics port {sorted(wanted)} is neither exposed nor published")
    return problems


def check_kafka_wiring(compose: dict) -> list[str]:
    problems = []
    services = compose["services"]
    for name in APP_SERVICES:
        brokers = broker_services(compose, name)
        inits = init_services(compose, name)
        if not brokers:
            problems.append(f"{name}: depends_on has no service with condition service_healthy")
        if not inits:
            problems.append(f"{name}: depends_on has no init service with condition service_completed_successfully")
        config = effective_config(compose, name)
        internal = set()
        for broker in brokers:
            if "healthcheck" not in services.get(broker, {}):
                problems.append(f"{broker}: {name} waits for it to be healthy but it has no healthcheck")
            for hostport in advertised_listeners(services.get(broker, {})).values():
                if hostport.split(":")[0] in services:
                    internal.add(hostport)
        for broker in filter(None, (config["KAFKA_BROKERS"] or "").split(",")):
            if broker.strip() not in internal:
                problems.append(
                    f"{name}: KAFKA_BROKERS {broker} is not a listener the broker advertises on the "
                    f"compose network ({sorted(internal)})"
                )
        created = {}
        for init in inits:
            service = services.get(init, {})
            if service.get("restart", "no") != "no":
                problems.append(f"{init}: a one-shot service must not restart")
            for topic, spec in created_topics(service).items():
                created[topic] = spec
                if not spec["if_not_exists"]:
                    problems.append(f"{init}: creating {topic} is not idempotent (--if-not-exists)")
                if spec["bootstrap"] not in internal:
                    problems.append(f"{init}: --bootstrap-server {spec['bootstrap']} is not an internal listener")
        for var in TOPIC_VARS[name]:
            topic = config[var]
            if topic not in created:
                problems.append(f"{name}: {var}={topic} is not created by {inits} (the service fails fast without it)")
        orders = created.get(config["ORDERS_TOPIC"])
        if orders and (orders["partitions"] or 1) < MIN_ORDERS_PARTITIONS:
            problems.append(f"{config['ORDERS_TOPIC']}: {orders['partitions']} partitions cannot feed 3 notify-svc replicas")
    kafka = services.get("kafka", {})
    host = {n: hp for n, hp in advertised_listeners(kafka).items() if hp.split(":")[0] in ("localhost", "127.0.0.1")}
    published = {t for p, t in parse_ports(kafka.get("ports")) if p is not None}
    if not host:
        problems.append("kafka: no listener advertised for the host (localhost:9092)")
    for listener, hostport in host.items():
        if addr_port(hostport) not in published:
            problems.append(f"kafka: host listener {listener} {hostport} is not published")
    return problems


def check_store(compose: dict) -> list[str]:
    """order-svc's DATABASE_URL names a PostgreSQL service of this file that
    has a pinned image, a health check, a named volume for its data and the
    credentials the URL uses; order-svc waits for it to be healthy and runs
    more than one replica, each with a host port of its own."""
    problems = []
    services = compose["services"]
    name = "order-svc"
    service = services[name]
    url = urllib.parse.urlsplit(effective_config(compose, name)["DATABASE_URL"] or "")
    if url.scheme not in ("postgres", "postgresql"):
        return [f"{name}: DATABASE_URL is {url.scheme or 'unset'}, not a PostgreSQL the replicas share"]
    db_name = url.hostname or ""
    db = services.get(db_name)
    if db is None:
        return [f"{name}: DATABASE_URL host {db_name} is not a service of compose.yaml"]
    if db_name not in broker_services(compose, name):
        problems.append(f"{name}: does not wait for {db_name} to be healthy")
    test = (db.get("healthcheck") or {}).get("test")
    if not test or "pg_isready" not in " ".join(test if isinstance(test, list) else [test]):
        problems.append(f"{db_name}: no pg_isready health check")
    env = environment(db)
    expected = {"POSTGRES_USER": url.username, "POSTGRES_PASSWORD": url.password, "POSTGRES_DB": url.path.lstrip("/")}
    for var, value in expected.items():
        if env.get(var) != value:
            problems.append(f"{db_name}: {var} is {env.get(var)!r}, DATABASE_URL uses {value!r}")
    if url.port != 5432:
        problems.append(f"{name}: DATABASE_URL port {url.port} is not PostgreSQL's 5432 in the container")
    named = set((compose.get("volumes") or {}).keys())
    data = [str(v).split(":") for v in db.get("volumes") or []]
    if not any(len(v) >= 2 and v[0] in named and v[1] == "/var/lib/postgresql/data" for v in data):
        problems.append(f"{db_name}: /var/lib/postgresql/data is not on a named volume (orders would not survive `down`)")
    replicas = (service.get("deploy") or {}).get("replicas", 1)
    if replicas < 2:
        problems.append(f"{name}: {replicas} replica(s); the store is there for several")
    for published, target in parse_ports(service.get("ports")):
        if published is None:
            continue
        lo, _, hi = published.partition("-")
        if int(hi or lo) - int(lo) + 1 < replicas:
            problems.append(f"{name}: host port {published}:{target} has fewer ports than its {replicas} replicas")
    if "container_name" in service:
        problems.append(f"{name}: container_name prevents replicas")
    return problems


def check_healthchecks(compose: dict, stages: list[dict]) -> list[str]:
    problems = []
    for name in APP_SERVICES:
        service = compose["services"][name]
        test = (service.get("healthcheck") or {}).get("test")
        if service.get("healthcheck", {}).get("disable") or not test:
            problems.append(f"{name}: no healthcheck")
            continue
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        argv = test[1:] if test[0] == "CMD" else shlex.split(" ".join(test[1:]))
        if not argv:
            problems.append(f"{name}: empty healthcheck")
            continue
        program, args = argv[0], argv[1:]
        bin_name = posixpath.basename(program)
        if bin_name not in workspace_bins():
            problems.append(f"{name}: healthcheck runs {program}, not a binary of this workspace")
            continue
        target = (service.get("build") or {}).get("target", name)
        installed = installed_binaries(stage_chain(stages, target), stages)
        if installed.get(bin_name) != program:
            problems.append(
                f"{name}: healthcheck runs {program} but the image (target {target}) has {bin_name} "
                f"at {installed.get(bin_name)}"
            )
        run = subprocess.run(
            [str(binary(bin_name)), *args, "--help"], capture_output=True, text=True, env=clean_env()
        )
        if run.returncode != 0:
            problems.append(f"{name}: `{bin_name} {' '.join(args)} --help` exits {run.returncode}: {run.stderr.strip()}")
        if bin_name != name:
            problems.append(f"{name}: healthcheck probes {bin_name}, not the service's own binary")
    return problems


def check_restart_and_images(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        if name in APP_SERVICES and service.get("restart", "no") == "no":
            problems.append(f"{name}: no restart policy")
        if name in APP_SERVICES and "profiles" in service:
            problems.append(f"{name}: must start with a plain `docker compose up` (no profile)")
        image = service.get("image")
        if "build" not in service:
            if not image:
                problems.append(f"{name}: neither image nor build")
                continue
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not (("@sha256:" in image) or (tag and tag != "latest" and re.search(r"\d", tag))):
                problems.append(f"{name}: image {image} is not pinned to a version")
    return problems


def check_dockerfile(text: str, compose: dict) -> list[str]:
    problems = []
    _, stages = dockerfile_stages(text)
    names = {s["name"] for s in stages}
    for stage in stages:
        base = stage["base"]
        if base in names or base == "scratch":
            continue
        tag = base.rsplit("/", 1)[-1].partition(":")[2]
        if "$" in base or not (("@sha256:" in base) or (tag and tag != "latest" and re.search(r"\d", tag))):
            problems.append(f"stage {stage['name']}: base image {base} is not pinned to a version")
    built: set[str] = set()
    for stage in stages:
        for instr, args in stage["instructions"]:
            if instr == "RUN" and "cargo build" in args:
                bins = set(re.findall(r"--bin[ =]([\w.-]+)", args))
                built |= bins
                for flag in ("--release", "--locked"):
                    if flag not in args.split():
                        problems.append(f"stage {stage['name']}: cargo build without {flag}")
                for unknown in bins - workspace_bins():
                    problems.append(f"Dockerfile builds --bin {unknown}, which the workspace does not have")
    for name in APP_SERVICES:
        if name not in built:
            problems.append(f"Dockerfile never builds {name}")
        service = compose["services"][name]
        build = service.get("build")
        if not isinstance(build, dict):
            problems.append(f"{name}: build must name a Dockerfile target")
            continue
        if build.get("dockerfile", "Dockerfile") != "Dockerfile" or build.get("context", ".") not in (".", "./"):
            problems.append(f"{name}: builds from something other than ./Dockerfile")
        target = build.get("target")
        if target not in names:
            problems.append(f"{name}: build target {target} is not a stage of the Dockerfile")
            continue
        chain = stage_chain(stages, target)
        user = stage_user(chain)
        if user is None or user.split(":")[0] in ("root", "0"):
            problems.append(f"target {target}: runs as {user or 'root (no USER)'}")
        installed = installed_binaries(chain, stages)
        entry = next((exec_form(a) for s in reversed(chain) for i, a in reversed(s["instructions"]) if i == "ENTRYPOINT"), None)
        if not entry or entry[0] != installed.get(name):
            problems.append(f"target {target}: ENTRYPOINT {entry} does not run the installed {name} ({installed.get(name)})")
        if not str(installed.get(name, "")).startswith("/usr/local/bin/"):
            problems.append(f"target {target}: {name} is not installed in /usr/local/bin")
    return problems


# Shared libraries the base image (glibc, libgcc) always has.
BASE_SONAMES = {
    "linux-vdso.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0",
    "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
}  # fmt: skip
# The Debian bookworm package providing each other library the binaries link.
SONAME_PACKAGES = {"libssl.so.3": "libssl3", "libcrypto.so.3": "libssl3", "libz.so.1": "zlib1g"}


def check_runtime_libraries(text: str, sonames: dict[str, set[str]]) -> list[str]:
    problems = []
    _, stages = dockerfile_stages(text)
    for name in APP_SERVICES:
        packages = apt_installed(stage_chain(stages, name))
        if "ca-certificates" not in packages:
            problems.append(f"target {name}: ca-certificates not installed (TLS to brokers and webhooks)")
        for soname in sorted(sonames[name] - BASE_SONAMES):
            package = SONAME_PACKAGES.get(soname)
            if package is None:
                problems.append(f"{name} links {soname}: add its Debian package to the runtime stage and to SONAME_PACKAGES")
            elif package not in packages:
                problems.append(f"target {name}: {name} links {soname} but {package} is not installed")
    return problems


def check_dockerignore(text: str) -> list[str]:
    problems = []
    patterns = dockerignore_patterns(text)
    for path in ("target", "target/release/order-svc", ".tools/venv/bin/python", ".git/HEAD",
                 "tests/node/node_modules/x/index.js", ".run/tansu.db"):  # fmt: skip
        if not ignored(path, patterns):
            problems.append(f".dockerignore does not exclude {path}")
    # ...but keeps everything `cargo build` reads.
    needed = {"Cargo.toml", "Cargo.lock", "build.rs"}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto")}
    for package in cargo_metadata()["packages"]:
        needed.add(str(Path(package["manifest_path"]).relative_to(ROOT)))
        for target in package["targets"]:
            if target["kind"] != ["test"] and target["kind"] != ["bench"]:
                needed.add(str(Path(target["src_path"]).relative_to(ROOT)))
    for path in sorted(needed):
        if ignored(path, patterns):
            problems.append(f".dockerignore excludes {path}, which the image build needs")
    return problems


def check_prometheus(compose: dict, prometheus_config: dict) -> list[str]:
    problems = []
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        if OBSERVABILITY not in (services.get(name, {}).get("profiles") or []):
            problems.append(f"{name}: not in the {OBSERVABILITY} profile")
    jobs = prometheus_config.get("scrape_configs") or []
    for name in APP_SERVICES:
        port = addr_port(effective_config(compose, name)["METRICS_ADDR"])
        found = False
        for job in jobs:
            if job.get("metrics_path", "/metrics") != "/metrics":
                continue
            for sd in job.get("dns_sd_configs") or []:
                if name in sd.get("names", []) and sd.get("type") == "A" and sd.get("port") == port:
                    found = True
            if name != "notify-svc":  # a scaled service needs discovery, not one address
                for sc in job.get("static_configs") or []:
                    found |= f"{name}:{port}" in sc.get("targets", [])
        if not found:
            problems.append(f"prometheus: no scrape job for {name} on port {port}" + (" via dns_sd_configs type A" if name == "notify-svc" else ""))
    return problems


def check_grafana(compose: dict, dashboards: dict[str, dict], datasources: list[dict]) -> list[str]:
    problems = []
    families = service_metrics()
    series = set().union(*families.values())
    used: set[str] = set()
    for file, dashboard in dashboards.items():
        for expr in dashboard_exprs(dashboard):
            names = promql_metric_names(expr)
            used |= names
            for unknown in names - series:
                problems.append(f"{file}: queries {unknown}, which no service exports ({expr})")
        uids = {d.get("uid") for d in datasources}
        for uid in dashboard_datasource_uids(dashboard) - uids:
            problems.append(f"{file}: datasource uid {uid} is not provisioned ({sorted(uids)})")
    for family, names in sorted(families.items()):
        if not names & used:
            problems.append(f"dashboards show no panel for {family}")
    prom_port = 9090
    for ds in datasources:
        if ds.get("type") == "prometheus" and ds.get("url") != f"http://prometheus:{prom_port}":
            problems.append(f"datasource {ds.get('name')}: url {ds.get('url')} is not the compose prometheus")
    if not any(ds.get("type") == "prometheus" for ds in datasources):
        problems.append("grafana: no prometheus datasource provisioned")
    return problems


# --------------------------------------------------------------------------
# Fixtures and tests on the real files
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def prometheus_config(compose) -> dict:
    service = compose["services"]["prometheus"]
    config_arg = next(a for a in service["command"] if a.startswith("--config.file="))
    path = mounted_host_path(service, config_arg.split("=", 1)[1])
    assert path and path.is_file(), f"prometheus config {config_arg} is not a mounted repository file"
    return yaml.safe_load(path.read_text())


def grafana_provisioning(compose) -> tuple[dict[str, dict], list[dict]]:
    service = compose["services"]["grafana"]
    provisioning = mounted_host_path(service, "/etc/grafana/provisioning")
    assert provisioning and provisioning.is_dir(), "grafana: /etc/grafana/provisioning is not mounted from the repo"
    datasources = []
    for f in sorted((provisioning / "datasources").glob("*.y*ml")):
        datasources += yaml.safe_load(f.read_text()).get("datasources") or []
    dashboards = {}
    for f in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(f.read_text()).get("providers") or []:
            folder = mounted_host_path(service, provider["options"]["path"])
            assert folder and folder.is_dir(), f"grafana: dashboard path {provider['options']['path']} is not mounted"
            for d in sorted(folder.glob("*.json")):
                dashboards[str(d.relative_to(ROOT))] = json.loads(d.read_text())
    assert dashboards, "grafana: no dashboard provisioned"
    return dashboards, datasources


def sonames(name: str) -> set[str]:
    out = subprocess.run(["ldd", str(binary(name))], capture_output=True, text=True, check=True)
    found = set()
    for line in out.stdout.splitlines():
        token = line.split()[0] if line.split() else ""
        found.add(posixpath.basename(token))
    return found


def test_compose_validates_against_the_compose_specification(compose):
    jsonschema.Draft7Validator.check_schema(compose_schema())
    assert check_schema(compose) == []


def test_every_environment_variable_is_documented_by_the_binary(compose):
    assert check_env_documented(compose) == []


def test_ports_match_what_the_binaries_listen_on(compose):
    assert check_ports(compose) == []


def test_services_wait_for_the_broker_and_the_topics_they_use(compose):
    assert check_kafka_wiring(compose) == []


def test_order_svc_replicas_share_a_pinned_healthy_postgres_with_a_volume(compose):
    assert check_store(compose) == []


def test_healthchecks_run_an_existing_subcommand_of_the_installed_binary(compose, dockerfile):
    _, stages = dockerfile_stages(dockerfile)
    assert check_healthchecks(compose, stages) == []


@pytest.mark.parametrize("name", APP_SERVICES)
def test_healthcheck_subcommand_probes_readyz_on_metrics_addr(name, compose):
    """What the container's healthcheck does, with METRICS_ADDR as compose sets
    it (0.0.0.0:port): 0 while /readyz answers 200, non-zero otherwise."""
    status = {"code": 200}
    paths = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            paths.append(self.path)
            self.send_response(status["code"] if self.path == "/readyz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = environment(compose["services"][name])["METRICS_ADDR"].rsplit(":", 1)[0]
        env = clean_env(METRICS_ADDR=f"{host}:{server.server_address[1]}")
        ok = subprocess.run([str(binary(name)), "healthcheck"], env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        assert paths == ["/readyz"]
        status["code"] = 503
        unready = subprocess.run([str(binary(name)), "healthcheck"], env=env, capture_output=True, timeout=30)
        assert unready.returncode != 0
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = subprocess.run(
        [str(binary(name)), "healthcheck"], env=clean_env(METRICS_ADDR=f"127.0.0.1:{closed}"),
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert down.returncode != 0


def test_restart_policies_profiles_and_pinned_images(compose):
    assert check_restart_and_images(compose) == []


def test_dockerfile_builds_workspace_binaries_into_non_root_targets(compose, dockerfile):
    assert check_dockerfile(dockerfile, compose) == []


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_runtime_stage_installs_the_libraries_the_binaries_link(dockerfile):
    found = {name: sonames(name) for name in APP_SERVICES}
    assert "libssl.so.3" in found["order-svc"], "expected librdkafka's OpenSSL; has the ssl feature gone?"
    assert check_runtime_libraries(dockerfile, found) == []


def test_dockerignore_keeps_local_state_out_and_sources_in():
    assert check_dockerignore(DOCKERIGNORE.read_text()) == []


def test_prometheus_scrapes_every_service_and_replica(compose, prometheus_config):
    assert check_prometheus(compose, prometheus_config) == []


def test_grafana_dashboard_shows_exactly_the_exported_metrics(compose):
    dashboards, datasources = grafana_provisioning(compose)
    assert check_grafana(compose, dashboards, datasources) == []


def test_docker_compose_config_when_the_plugin_exists():
    """An extra check where the `docker compose` plugin is installed (it needs no engine)."""
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    for args in ([], ["--profile", OBSERVABILITY]):
        run = subprocess.run(["docker", "compose", *args, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr


# --------------------------------------------------------------------------
# Each check can fail: feed it a broken copy
# --------------------------------------------------------------------------


def _set(path: str, value):
    def mutate(c):
        *keys, last = path.split(".")
        node = c
        for k in keys:
            node = node[k]
        node[last] = value

    return mutate


def _del(path: str):
    def mutate(c):
        *keys, last = path.split(".")
        node = c
        for k in keys:
            node = node[k]
        del node[last]

    return mutate


S = "services"
COMPOSE_MUTATIONS = [
    ("unknown key", _set(f"{S}.order-svc.restart_policy", "always"), check_schema),
    ("ports of the wrong type", _set(f"{S}.notify-svc.expose", 9091), check_schema),
    ("undocumented variable", _set(f"{S}.order-svc.environment.RUST_LOG", "debug"), check_env_documented),
    ("misspelt variable", _set(f"{S}.notify-svc.environment.KAFKA_GROUP", "g"), check_env_documented),
    ("env_file", _set(f"{S}.notify-svc.env_file", ".env"), check_env_documented),
    ("metrics port moved, ports not", _set(f"{S}.order-svc.environment.METRICS_ADDR", "0.0.0.0:9100"), check_ports),
    ("grpc port not published", _set(f"{S}.order-svc.ports", ["9090:9090"]), check_ports),
    ("fixed notify host port", _set(f"{S}.notify-svc.ports", ["9091:9091"]), check_ports),
    ("notify container_name", _set(f"{S}.notify-svc.container_name", "notify"), check_ports),
    ("notify metrics port moved", _set(f"{S}.notify-svc.environment.METRICS_ADDR", "0.0.0.0:9191"), check_ports),
    ("topic nobody creates", _set(f"{S}.order-svc.environment.ORDERS_TOPIC", "orders-v2"), check_kafka_wiring),
    ("dlq nobody creates", _set(f"{S}.notify-svc.environment.DLQ_TOPIC", "dlq"), check_kafka_wiring),
    ("host listener as broker", _set(f"{S}.notify-svc.environment.KAFKA_BROKERS", "localhost:9092"), check_kafka_wiring),
    ("no wait for topics", _set(f"{S}.order-svc.depends_on", {"kafka": {"condition": "service_healthy"}}), check_kafka_wiring),
    ("broker without healthcheck", _del(f"{S}.kafka.healthcheck"), check_kafka_wiring),
    ("host listener unpublished", _set(f"{S}.kafka.ports", []), check_kafka_wiring),
    ("no restart policy", _del(f"{S}.notify-svc.restart"), check_restart_and_images),
    ("unpinned image", _set(f"{S}.kafka.image", "apache/kafka:latest"), check_restart_and_images),
    ("app behind a profile", _set(f"{S}.order-svc.profiles", ["x"]), check_restart_and_images),
    ("unpinned postgres", _set(f"{S}.postgres.image", "postgres"), check_restart_and_images),
    ("store is a file per replica", _set(f"{S}.order-svc.environment.DATABASE_URL", "sqlite://orders.db"), check_store),
    ("store host unknown", _set(f"{S}.order-svc.environment.DATABASE_URL", "postgres://orders:orders@db:5432/orders"), check_store),
    ("wrong password", _set(f"{S}.postgres.environment.POSTGRES_PASSWORD", "x"), check_store),
    ("no wait for postgres", _del(f"{S}.order-svc.depends_on.postgres"), check_store),
    ("postgres without healthcheck", _del(f"{S}.postgres.healthcheck"), check_store),
    ("postgres data not on a volume", _set(f"{S}.postgres.volumes", []), check_store),
    ("one replica", _del(f"{S}.order-svc.deploy"), check_store),
    ("fixed host port with replicas", _set(f"{S}.order-svc.ports", ["50051:50051", "9090-9091:9090"]), check_store),
]


@pytest.mark.parametrize("what, mutate, check", COMPOSE_MUTATIONS, ids=[m[0] for m in COMPOSE_MUTATIONS])
def test_mutation_compose_check_fails(what, mutate, check):
    broken = copy.deepcopy(load_compose())
    mutate(broken)
    assert check(broken), f"{check.__name__} did not notice: {what}"


def test_mutation_orders_topic_created_without_partitions_or_idempotence():
    broken = copy.deepcopy(load_compose())
    init = broken["services"]["kafka-init"]
    init["command"] = [c.replace("--partitions 6", "--partitions 1").replace("--if-not-exists ", "") for c in init["command"]]
    problems = check_kafka_wiring(broken)
    assert any("partitions" in p for p in problems) and any("idempotent" in p for p in problems), problems


@pytest.mark.parametrize(
    "what, healthcheck",
    [
        ("no such subcommand", ["CMD", "/usr/local/bin/order-svc", "health"]),
        ("not installed there", ["CMD", "/usr/bin/order-svc", "healthcheck"]),
        ("another service's binary", ["CMD", "/usr/local/bin/notify-svc", "healthcheck"]),
        ("a tool the image lacks", ["CMD", "curl", "-f", "http://localhost:9090/readyz"]),
    ],
)
def test_mutation_healthcheck_check_fails(what, healthcheck, dockerfile):
    broken = copy.deepcopy(load_compose())
    broken["services"]["order-svc"]["healthcheck"]["test"] = healthcheck
    _, stages = dockerfile_stages(dockerfile)
    assert check_healthchecks(broken, stages), what


@pytest.mark.parametrize(
    "what, old, new",
    [
        ("unknown binary", "--bin notify-svc", "--bin notify-service"),
        ("binary not built", " --bin notify-svc", ""),
        ("not --locked", "--release --locked", "--release"),
        ("root user", "USER 10001:10001", "USER root"),
        ("no user", "USER 10001:10001\n", ""),
        ("unpinned base", "rust:1.95.0-bookworm", "rust:latest"),
        ("missing target", "AS notify-svc", "AS notify"),
        ("binary elsewhere", "/usr/local/bin/\n", "/opt/\n"),
    ],
)
def test_mutation_dockerfile_check_fails(what, old, new, dockerfile, compose):
    assert old in dockerfile, f"mutation {what!r} no longer applies: update it"
    assert check_dockerfile(dockerfile.replace(old, new), compose), what


def test_mutation_runtime_libraries_check_fails(dockerfile):
    linked = {name: {"libc.so.6", "libssl.so.3", "libz.so.1"} for name in APP_SERVICES}
    assert check_runtime_libraries(dockerfile.replace("libssl3 ", ""), linked)
    assert check_runtime_libraries(dockerfile, {n: s | {"libsasl2.so.2"} for n, s in linked.items()})


@pytest.mark.parametrize(
    "drop", [("target", "**/target"), (".tools",), (".git",), ("**/node_modules",), (".run",)]
)
def test_mutation_dockerignore_check_fails(drop):
    kept = [line for line in DOCKERIGNORE.read_text().splitlines() if line.strip() not in drop]
    assert check_dockerignore("\n".join(kept)), f"dropping {drop} went unnoticed"


def test_mutation_dockerignore_excluding_sources_fails():
    text = DOCKERIGNORE.read_text()
    for extra in ("proto", "*.toml", "**/src", "!target"):
        assert check_dockerignore(text + "\n" + extra + "\n"), extra


def test_mutation_prometheus_check_fails(compose, prometheus_config):
    broken = copy.deepcopy(prometheus_config)
    for job in broken["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            if "notify-svc" in sd["names"]:
                job.pop("dns_sd_configs")
                job["static_configs"] = [{"targets": ["notify-svc:9091"]}]
    assert check_prometheus(compose, broken), "a static target cannot see scaled replicas"
    moved = copy.deepcopy(compose)
    moved["services"]["order-svc"]["environment"]["METRICS_ADDR"] = "0.0.0.0:9100"
    assert check_prometheus(moved, prometheus_config)
    unprofiled = copy.deepcopy(compose)
    del unprofiled["services"]["grafana"]["profiles"]
    assert check_prometheus(unprofiled, prometheus_config)


def test_mutation_grafana_check_fails(compose):
    dashboards, datasources = grafana_provisioning(compose)
    file, dashboard = next(iter(dashboards.items()))
    typo = copy.deepcopy(dashboard)
    typo["panels"][1]["targets"][0]["expr"] = "sum(rate(orders_total[5m]))"
    assert any("orders_total" in p for p in check_grafana(compose, {file: typo}, datasources))
    missing = copy.deepcopy(dashboard)
    missing["panels"] = [p for p in missing["panels"] if "kafka_consumer_lag" not in json.dumps(p)]
    assert any("kafka_consumer_lag" in p for p in check_grafana(compose, {file: missing}, datasources))
    assert check_grafana(compose, dashboards, [dict(d, uid="other") for d in datasources])


def test_promql_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{grpc_code!="OK"}[$__rate_interval])))'
        " / clamp_min(sum(rate(orders_created_total[5m] offset 1h)), 1e-9) > bool 2"
    )
    assert promql_metric_names(expr) == {"grpc_server_handling_seconds_bucket", "orders_created_total"}


def test_help_parsing_reads_env_and_defaults():
    documented = documented_env("notify-svc")
    assert documented["METRICS_ADDR"] == "0.0.0.0:9091"
    assert documented["KAFKA_GROUP_ID"] == "notification-group"
    assert "KAFKA_OPTIONS" in documented and documented["KAFKA_OPTIONS"] is None
    assert documented_env("order-svc")["GRPC_ADDR"] == "0.0.0.0:50051"
