"""compose.yaml: valid for docker-compose, and wired the way the services actually read it.

No Docker engine runs here, so nothing is started: `docker-compose config` validates and
normalizes the file, and the asserts check what a user depends on when they run it: the
gateway is published on 50051, every MLMESH_* variable is one the settings classes read
(pydantic-settings would silently ignore a misspelt one), the services find each other, Triton
loads the models the router routes to, the analytics plane (gateway -> Kafka -> logger ->
ClickHouse, and the drift service the registry asks) is wired to one broker and one store, and
startup waits on health checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import types
import typing
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml
from google.protobuf import text_format
from pydantic import BaseModel
from pydantic_settings import BaseSettings
from tritonclient.grpc import model_config_pb2

from services.common.kafka import KafkaSettings
from services.common.settings import REPO_ROOT, TelemetrySettings
from services.drift.settings import DriftSettings
from services.gateway.settings import GatewaySettings
from services.logger.settings import LoggerSettings
from services.registry.settings import RegistrySettings
from services.router.settings import DEFAULT_ROUTES, RouterSettings

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
TRITON_DOCKERFILE = REPO_ROOT / "Dockerfile.triton"
MLMESH_DOCKERFILE = REPO_ROOT / "Dockerfile"
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DOCKER_COMPOSE = shutil.which("docker-compose")
NEEDS_DOCKER_COMPOSE = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="the docker-compose binary is not installed: `apt-get install -y docker-compose` (Debian 12 ships "
    "1.29; no Docker engine is needed to validate) or run scripts/setup.sh, which installs it",
)
# Settings classes by env prefix, and process-level variables read outside them.
SETTINGS_BY_PREFIX: dict[str, type[BaseSettings]] = {
    "MLMESH_GATEWAY_": GatewaySettings,
    "MLMESH_ROUTER_": RouterSettings,
    "MLMESH_LOGGER_": LoggerSettings,
    "MLMESH_REGISTRY_": RegistrySettings,
    "MLMESH_DRIFT_": DriftSettings,
    "MLMESH_OTEL_": TelemetrySettings,
}
PROCESS_VARIABLES = {
    "MLMESH_SERVICES": "services/mesh.py picks the services to host",
    "MLMESH_LOG_LEVEL": "services/mesh.py main()",
    "MLMESH_LOG_FORMAT": "services/mesh.py main()",
    "MLMESH_LLM_MODEL_DIR": "model_repository/llm/1/model.py, inside Triton",
}
TRITON_GRPC_PORT = 8001  # tritonserver's default; the image's CMD does not change it
CLICKHOUSE_HTTP_PORT = 8123  # clickhouse-server's HTTP interface (the image's default)
SERVICES = (
    "models",
    "triton",
    "postgres",
    "registry",
    "router",
    "gateway",
    "kafka",
    "clickhouse",
    "logger",
    "drift",
)

pytestmark = pytest.mark.integration


# ---- loading and normalizing (docker-compose 1.x and 2.x print some fields differently) ----


def _compose_env() -> dict[str, str]:
    """The caller's environment minus what would change the rendered file (MLMESH_* included:
    MLMESH_LLM, the ClickHouse credentials and the passed-through PII salt are interpolated)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "MLMESH_")) and k != "DOCKER_HOST"}


def _docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE_FILE), *args],
        cwd=REPO_ROOT,
        env=_compose_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _interpolate_defaults(value: Any) -> Any:
    """Without docker-compose: `${VAR:-default}` -> default, `${VAR}` -> "", `$$` -> `$` (what it
    renders from an environment without the MLMESH_* variables, as _compose_env() passes it)."""
    if isinstance(value, dict):
        return {key: _interpolate_defaults(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate_defaults(item) for item in value]
    if not isinstance(value, str):
        return value
    substituted = re.sub(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    return substituted.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as docker-compose resolves it (interpolated, normalized); raw YAML without it."""
    if DOCKER_COMPOSE is None:
        return _interpolate_defaults(yaml.safe_load(COMPOSE_FILE.read_text()))
    rendered = _docker_compose("--profile", "gpu", "config")
    assert rendered.returncode == 0, f"docker-compose config failed:\n{rendered.stderr}"
    return yaml.safe_load(rendered.stdout)


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"compose.yaml has no service {name!r}"
    return compose["services"][name]


def _raw_environment(svc: dict[str, Any]) -> dict[str, Any]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {str(k): v for k, v in env.items()}


def environment(svc: dict[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in _raw_environment(svc).items()}


def unset_passthrough(svc: dict[str, Any]) -> set[str]:
    """Variables listed without a value that the caller's environment did not set either: the
    container does not get them at all (not even empty)."""
    return {k for k, v in _raw_environment(svc).items() if v is None}


def published_ports(svc: dict[str, Any]) -> dict[int, int]:
    """{published host port: container port}."""
    ports: dict[int, int] = {}
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published") is not None:
                ports[int(entry["published"])] = int(entry["target"])
        else:
            parts = str(entry).split("/")[0].split(":")
            if len(parts) >= 2:
                ports[int(parts[-2])] = int(parts[-1])
    return ports


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """{container path: source (volume name or host path)}."""
    result: dict[str, str] = {}
    for entry in svc.get("volumes") or []:
        if isinstance(entry, dict):
            result[entry["target"]] = str(entry.get("source", ""))
        else:
            source, target = str(entry).split(":")[:2]
            result[target] = source
    return result


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def dockerfile_cmd(path: Path) -> list[str]:
    """The final CMD of a Dockerfile (exec form)."""
    text = path.read_text().replace("\\\n", " ")
    cmds = re.findall(r"^CMD\s+(\[.*\])\s*$", text, flags=re.M)
    assert cmds, f"{path.name} has no exec-form CMD"
    return json.loads(cmds[-1])


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def path_under_mount(path: str, svc: dict[str, Any]) -> tuple[str, str] | None:
    """(mount target, source) of the mount that holds `path`, if any (the deepest: mounts nest)."""
    holders = [
        (target, source)
        for target, source in mounts(svc).items()
        if path == target or path.startswith(target.rstrip("/") + "/")
    ]
    return max(holders, key=lambda holder: len(holder[0]), default=None)


def triton_config(name: str) -> model_config_pb2.ModelConfig:
    path = MODEL_REPOSITORY / name / "config.pbtxt"
    assert path.is_file(), f"{path} is missing"
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X (a nested model may be optional); other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def settings_field_for(settings_cls: type[BaseSettings], variable: str, prefix: str) -> str | None:
    """Why `variable` is not read by settings_cls (None when it maps to a field, nested or not)."""
    parts = variable[len(prefix) :].lower().split("__")
    model: type[BaseModel] | None = settings_cls
    for depth, part in enumerate(parts):
        if model is None:
            return None  # inside a dict-typed field: any key is a valid entry
        if part not in model.model_fields:
            where = model.__name__ if depth else settings_cls.__name__
            return f"{variable}: {where} has no field {part!r} (fields: {sorted(model.model_fields)})"
        annotation = _without_none(model.model_fields[part].annotation)
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif origin is dict:
            model = None
        elif depth < len(parts) - 1:
            return f"{variable}: {model.__name__}.{part} is not a nested model"
    return None


# ---- the checks ----


@NEEDS_DOCKER_COMPOSE
@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_accepts_the_file(profile: str | None) -> None:
    args = ("--profile", profile, "config", "-q") if profile else ("config", "-q")
    result = _docker_compose(*args)
    assert result.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{result.stderr}"
    services = _docker_compose(*(args[:2] if profile else ()), "config", "--services")
    assert services.returncode == 0, services.stderr
    names = set(services.stdout.split())
    assert set(SERVICES) <= names
    if profile == "gpu":
        assert "triton-gpu" in names


def test_gateway_is_published_on_50051_and_listens_there(compose: dict[str, Any]) -> None:
    gateway = service(compose, "gateway")
    env = environment(gateway)
    container_port = int(env.get("MLMESH_GATEWAY_PORT", GatewaySettings.model_fields["port"].default))
    assert published_ports(gateway).get(50051) == container_port, gateway.get("ports")
    assert env.get("MLMESH_GATEWAY_HOST") == "0.0.0.0", "the gateway must listen beyond the container's loopback"


@pytest.mark.parametrize("name", [*SERVICES, "triton-gpu"])
def test_every_mlmesh_variable_is_read_by_someone(compose: dict[str, Any], name: str) -> None:
    problems = []
    for variable in environment(service(compose, name)):
        if not variable.startswith("MLMESH_") or variable in PROCESS_VARIABLES:
            continue
        prefix = next((p for p in SETTINGS_BY_PREFIX if variable.startswith(p)), None)
        if prefix is None:
            problems.append(f"{variable}: no settings class or process reads it")
            continue
        problem = settings_field_for(SETTINGS_BY_PREFIX[prefix], variable, prefix)
        if problem:
            problems.append(problem)
    assert not problems, f"service {name}:\n" + "\n".join(problems)


def test_llm_model_dir_variable_is_the_one_the_triton_model_reads() -> None:
    model_py = (MODEL_REPOSITORY / "llm" / "1" / "model.py").read_text()
    assert re.search(r"""MODEL_DIR_ENV\s*=\s*["']MLMESH_LLM_MODEL_DIR["']""", model_py)


def load_settings(
    compose: dict[str, Any], name: str, settings_cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> BaseSettings:
    """settings_cls as the service's container builds it from its compose environment."""
    for variable in list(os.environ):
        if variable.startswith("MLMESH_"):
            monkeypatch.delenv(variable)
    svc = service(compose, name)
    unset = unset_passthrough(svc)
    for variable, value in environment(svc).items():
        if variable not in unset:
            monkeypatch.setenv(variable, value)
    return settings_cls()


@pytest.mark.parametrize(
    ("name", "settings_cls"),
    [
        ("router", RouterSettings),
        ("gateway", GatewaySettings),
        ("logger", LoggerSettings),
        ("drift", DriftSettings),
        ("registry", RegistrySettings),
    ],
)
def test_service_settings_load_from_the_compose_environment(
    compose: dict[str, Any], name: str, settings_cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values parse too (a port that is not a number, a bad nested value, would fail here)."""
    settings = load_settings(compose, name, settings_cls, monkeypatch)
    env = environment(service(compose, name))
    assert settings.host == "0.0.0.0"
    if name == "router":
        assert isinstance(settings, RouterSettings)
        assert settings.triton_url == env["MLMESH_ROUTER_TRITON_URL"]
    elif name == "gateway":
        assert isinstance(settings, GatewaySettings)
        assert settings.router_address == env["MLMESH_GATEWAY_ROUTER_ADDRESS"]
        assert str(settings.keys_db) == env["MLMESH_GATEWAY_KEYS_DB"]
        assert settings.events.enabled, "the gateway would not emit events"
        assert str(settings.events.spool_dir) == env["MLMESH_GATEWAY_EVENTS__SPOOL_DIR"]
    elif name == "logger":
        assert isinstance(settings, LoggerSettings)
        assert settings.clickhouse_dsn == env["MLMESH_LOGGER_CLICKHOUSE_DSN"]
        assert settings.kafka.bootstrap_servers == env["MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS"]
    elif name == "drift":
        assert isinstance(settings, DriftSettings)
        assert settings.clickhouse_dsn, "`python -m services.drift` exits without a DSN"
        assert settings.clickhouse_dsn == env["MLMESH_DRIFT_CLICKHOUSE_DSN"]
        assert settings.kafka.bootstrap_servers == env["MLMESH_DRIFT_KAFKA__BOOTSTRAP_SERVERS"]
    else:
        assert isinstance(settings, RegistrySettings)
        assert settings.analysis_address == env["MLMESH_REGISTRY_ANALYSIS_ADDRESS"]


def test_services_find_each_other(compose: dict[str, Any]) -> None:
    router_env = environment(service(compose, "router"))
    assert "MLMESH_ROUTER_TRITON_URL" in router_env, "without it the router dials Triton on its own loopback"
    triton_host, triton_port = host_port(router_env["MLMESH_ROUTER_TRITON_URL"])
    assert (triton_host, triton_port) == ("triton", TRITON_GRPC_PORT), "Triton's gRPC endpoint is triton:8001"
    assert router_env.get("MLMESH_ROUTER_HOST") == "0.0.0.0", "the router must accept the gateway container"

    gateway_env = environment(service(compose, "gateway"))
    assert "MLMESH_GATEWAY_ROUTER_ADDRESS" in gateway_env, "a gateway without a co-hosted router needs it"
    router_host, router_port = host_port(gateway_env["MLMESH_GATEWAY_ROUTER_ADDRESS"])
    assert router_host == "router", gateway_env["MLMESH_GATEWAY_ROUTER_ADDRESS"]
    assert router_port == int(router_env.get("MLMESH_ROUTER_PORT", RouterSettings.model_fields["port"].default))


def test_gateway_keys_survive_restarts(compose: dict[str, Any]) -> None:
    gateway = service(compose, "gateway")
    keys_db = environment(gateway)["MLMESH_GATEWAY_KEYS_DB"]
    mount = path_under_mount(keys_db, gateway)
    assert mount is not None, f"{keys_db} is not on a volume: API keys would vanish with the container"
    assert mount[1] in (compose.get("volumes") or {}), f"{mount[1]} should be a named volume"


def test_gateway_and_logger_share_one_kafka(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    gateway_env = environment(service(compose, "gateway"))
    logger_env = environment(service(compose, "logger"))
    assert gateway_env.get("MLMESH_GATEWAY_EVENTS__ENABLED") == "true", "the gateway emits no events"
    gateway_bootstrap = gateway_env.get("MLMESH_GATEWAY_EVENTS__KAFKA__BOOTSTRAP_SERVERS")
    logger_bootstrap = logger_env.get("MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS")
    assert gateway_bootstrap, "without it the gateway produces to its own loopback"
    assert gateway_bootstrap == logger_bootstrap, "the logger must consume from the broker the gateway produces to"

    # Every bootstrap address is the kafka service's advertised in-network listener.
    kafka_env = environment(service(compose, "kafka"))
    advertised = {
        host_port(listener.split("://", 1)[1]) for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    for address in gateway_bootstrap.split(","):
        assert host_port(address.strip()) in advertised, f"{address} is not a listener kafka advertises: {advertised}"
        assert host_port(address.strip())[0] == "kafka"

    # Same topic names on both sides (the defaults, unless both override them alike).
    gateway = load_settings(compose, "gateway", GatewaySettings, monkeypatch)
    logger = load_settings(compose, "logger", LoggerSettings, monkeypatch)
    assert isinstance(gateway, GatewaySettings) and isinstance(logger, LoggerSettings)
    assert gateway.events.kafka.topics == logger.kafka.topics


def test_kafka_is_a_single_kraft_node_without_topic_auto_creation(compose: dict[str, Any]) -> None:
    kafka = service(compose, "kafka")
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, combined node"
    assert env.get("CLUSTER_ID"), "KRaft storage is formatted with CLUSTER_ID"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "the services create their topics explicitly"
    # One broker: nothing may ask for more replicas than that, or topics/groups never come up.
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert KafkaSettings().replication_factor == 1
    mount = path_under_mount(env["KAFKA_LOG_DIRS"], kafka)
    assert mount is not None and mount[1] in (compose.get("volumes") or {}), "the event log must be on a volume"
    check = " ".join(kafka["healthcheck"]["test"])
    assert re.search(r"/opt/kafka/bin/kafka-(broker-api-versions|topics)\.sh", check), check


def test_logger_stores_into_the_clickhouse_service(compose: dict[str, Any]) -> None:
    clickhouse = service(compose, "clickhouse")
    assert clickhouse["image"].startswith("clickhouse/clickhouse-server:25.8")  # logger ingest schema inline needs >= 25.7
    ch_env = environment(clickhouse)
    dsn = urlparse(environment(service(compose, "logger"))["MLMESH_LOGGER_CLICKHOUSE_DSN"])
    assert dsn.scheme == "http", "the logger must talk to the server over HTTP, not embedded chdb"
    assert (dsn.hostname, dsn.port) == ("clickhouse", CLICKHOUSE_HTTP_PORT)
    # The credentials and database the server's entrypoint creates (clickhouse-connect unquotes them).
    assert ch_env.get("CLICKHOUSE_USER") and ch_env.get("CLICKHOUSE_PASSWORD")
    assert unquote(dsn.username or "") == ch_env["CLICKHOUSE_USER"]
    assert unquote(dsn.password or "") == ch_env["CLICKHOUSE_PASSWORD"]
    assert unquote(dsn.path.lstrip("/")) == ch_env.get("CLICKHOUSE_DB", "default")
    mount = path_under_mount("/var/lib/clickhouse", clickhouse)
    assert mount is not None and mount[1] in (compose.get("volumes") or {}), "ClickHouse data must be on a volume"


def test_logger_pii_salt_is_secret_and_stable(compose: dict[str, Any]) -> None:
    logger = service(compose, "logger")
    env = environment(logger)
    salt = env.get("MLMESH_LOGGER_PII_HASH_SALT")
    if salt is not None and "MLMESH_LOGGER_PII_HASH_SALT" not in unset_passthrough(logger):
        assert salt, "an empty salt hashes PII without a secret"
        return
    # Not given: generated once into the salt file, which must outlive the container.
    salt_file = env.get(
        "MLMESH_LOGGER_PII_HASH_SALT_FILE", str(LoggerSettings.model_fields["pii_hash_salt_file"].default)
    )
    mount = path_under_mount(salt_file, logger)
    assert mount is not None and mount[1] in (compose.get("volumes") or {}), (
        f"{salt_file} is on no named volume: every new container would hash with a new salt"
    )


def test_gateway_spools_to_a_volume_it_owns(compose: dict[str, Any]) -> None:
    gateway = service(compose, "gateway")
    spool_dir = environment(gateway)["MLMESH_GATEWAY_EVENTS__SPOOL_DIR"]
    mount = path_under_mount(spool_dir, gateway)
    assert mount is not None and mount[1] in (compose.get("volumes") or {}), (
        "spooled events would die with the container"
    )
    # A named volume starts with the image directory's owner; one on a path the image lacks is
    # root's, and the gateway runs as a non-root user.
    target = mount[0]
    dockerfile = MLMESH_DOCKERFILE.read_text().replace("\\\n", " ")
    assert re.search(rf"mkdir -p [^&]*{re.escape(target)}(\s|$)", dockerfile), f"the image must create {target}"
    chowned = re.findall(r"chown -R mlmesh:mlmesh ([^&]*)", dockerfile)
    assert any(
        target == path or target.startswith(path.rstrip("/") + "/") for paths in chowned for path in paths.split()
    ), f"the image must give {target} to the user the gateway runs as"


def test_triton_loads_every_model_the_router_routes_to(compose: dict[str, Any]) -> None:
    triton = service(compose, "triton")
    cmd = command(triton) or dockerfile_cmd(TRITON_DOCKERFILE)
    assert cmd[0] == "tritonserver"
    assert "--model-control-mode=explicit" in cmd
    loaded = {arg.split("=", 1)[1] for arg in cmd if arg.startswith("--load-model=")}
    routed = {route.triton_model for route in DEFAULT_ROUTES.values()}
    assert routed == {"tabular_classifier", "llm"}
    assert routed <= loaded, f"Triton loads {sorted(loaded)}, the router routes to {sorted(routed)}"
    for name in loaded:
        assert triton_config(name).name == name

    # The repository the CMD serves is where the image puts model_repository/ and the built ONNX.
    repository = next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--model-repository="))
    dockerfile = TRITON_DOCKERFILE.read_text()
    assert re.search(rf"^COPY\s+model_repository/?\s+{re.escape(repository)}/?\s*$", dockerfile, flags=re.M)
    assert re.search(
        rf"^COPY\s+--from=\S+\s+\S+/model\.onnx\s+{re.escape(repository)}/tabular_classifier/1/model\.onnx\s*$",
        dockerfile,
        flags=re.M,
    ), "the tabular_classifier ONNX must be built into the Triton image"


def test_llm_weights_reach_triton_through_the_models_volume(compose: dict[str, Any]) -> None:
    triton, models = service(compose, "triton"), service(compose, "models")
    assert triton_config("llm").parameters["model_dir"].string_value == "", "config.pbtxt would override the env"
    model_dir = environment(triton)["MLMESH_LLM_MODEL_DIR"]
    triton_mount = path_under_mount(model_dir, triton)
    assert triton_mount is not None, f"MLMESH_LLM_MODEL_DIR={model_dir} is on no volume of the triton service"
    target, volume = triton_mount
    assert mounts(models).get(target) == volume, "the models service must write the volume Triton reads"
    script = " ".join(command(models))
    assert "services.common.model_build.llm" in script and f"--out-root {target}" in script
    assert model_dir.rstrip("/").rsplit("/", 1)[-1] in script, "the models service must create MLMESH_LLM_MODEL_DIR"
    assert depends_on(triton).get("models") == "service_completed_successfully"


def test_startup_waits_on_health_checks(compose: dict[str, Any]) -> None:
    for name in ("triton", "router", "gateway", "kafka", "clickhouse", "logger", "drift"):
        test = service(compose, name).get("healthcheck", {}).get("test")
        assert test and test != ["NONE"], f"{name} has no health check"
    order = {name: depends_on(service(compose, name)) for name in ("router", "gateway", "logger", "drift")}
    assert order["router"].get("triton") == "service_healthy", f"router starts before Triton is ready: {order}"
    assert order["gateway"].get("router") == "service_healthy", f"gateway starts before the router is ready: {order}"
    assert order["gateway"].get("kafka") == "service_healthy", f"gateway starts before Kafka is ready: {order}"
    assert order["logger"].get("kafka") == "service_healthy", f"logger starts before Kafka is ready: {order}"
    assert order["logger"].get("clickhouse") == "service_healthy", f"logger starts before ClickHouse: {order}"
    # Drift reads the tables the logger's migrations create, and publishes alerts to Kafka.
    assert order["drift"].get("logger") == "service_healthy", f"drift starts before the logger migrated: {order}"
    assert order["drift"].get("kafka") == "service_healthy", f"drift starts before Kafka is ready: {order}"

    clickhouse_check = " ".join(service(compose, "clickhouse")["healthcheck"]["test"])
    assert f":{CLICKHOUSE_HTTP_PORT}/ping" in clickhouse_check, clickhouse_check

    triton_check = " ".join(service(compose, "triton")["healthcheck"]["test"])
    assert "/v2/health/ready" in triton_check
    for name in ("tabular_classifier", "llm"):
        assert f"/v2/models/{name}/ready" in triton_check
    for name, env_port in (
        ("router", "MLMESH_ROUTER_PORT"),
        ("gateway", "MLMESH_GATEWAY_PORT"),
        ("logger", "MLMESH_LOGGER_PORT"),
        ("drift", "MLMESH_DRIFT_PORT"),
    ):
        check = " ".join(service(compose, name)["healthcheck"]["test"])
        assert "grpc_health" in check and "HealthStub" in check, f"{name}: use the gRPC health service"
        assert f":{environment(service(compose, name))[env_port]}'" in check, f"{name}: health check on another port"


def test_gpu_profile_serves_vllm_on_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    gpu = service(compose, "triton-gpu")
    assert gpu.get("profiles") == ["gpu"], "the GPU service must stay out of a plain `up`"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "vllm" in gpu["image"]
    cmd = command(gpu)
    assert "--model-control-mode=explicit" in cmd and "--load-model=vllm_llm" in cmd
    repository = next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--model-repository="))
    assert (REPO_ROOT / mounts(gpu)[f"{repository}/vllm_llm"]).resolve() == (MODEL_REPOSITORY / "vllm_llm").resolve()

    config = triton_config("vllm_llm")
    assert config.backend == "vllm" and config.model_transaction_policy.decoupled
    assert {i.name for i in config.input} >= {"text_input", "stream", "sampling_parameters"}
    assert [o.name for o in config.output] == ["text_output"]
    engine_args = json.loads((MODEL_REPOSITORY / "vllm_llm" / "1" / "model.json").read_text())
    assert path_under_mount(engine_args["model"], gpu) is not None, "vLLM's weights must be on a mounted volume"
    assert (MODEL_REPOSITORY / "tensorrt_llm" / "README.md").is_file()


def test_registry_keeps_state_in_postgres_and_routers_follow_it(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = load_settings(compose, "registry", RegistrySettings, monkeypatch)
    assert isinstance(registry, RegistrySettings)
    assert registry.host == "0.0.0.0"
    assert registry.database_url.startswith("postgresql://") and "@postgres:5432/" in registry.database_url
    assert host_port(registry.triton_url) == ("triton", TRITON_GRPC_PORT)
    # The seeded directories exist in the image (the Dockerfile copies model_repository/ to /app).
    for model in registry.seed:
        assert model.directory.startswith("/app/model_repository/")
        assert (REPO_ROOT / model.directory.removeprefix("/app/") / "config.pbtxt").is_file(), model.directory
    assert {m.name for m in registry.seed} == set(DEFAULT_ROUTES)

    router_env = environment(service(compose, "router"))
    assert host_port(router_env["MLMESH_ROUTER_REGISTRY_ADDRESS"]) == ("registry", registry.port)
    postgres = service(compose, "postgres")
    assert "registry" in service(compose, "router").get("depends_on", {})
    assert "postgres" in service(compose, "registry").get("depends_on", {})
    assert environment(postgres)["POSTGRES_DB"] in registry.database_url


def test_registry_asks_the_drift_service_which_shares_the_loggers_store_and_broker(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    drift_svc = service(compose, "drift")
    assert command(drift_svc) == ["python", "-m", "services.drift"]
    drift = load_settings(compose, "drift", DriftSettings, monkeypatch)
    logger = load_settings(compose, "logger", LoggerSettings, monkeypatch)
    registry = load_settings(compose, "registry", RegistrySettings, monkeypatch)
    assert isinstance(drift, DriftSettings) and isinstance(logger, LoggerSettings)
    assert isinstance(registry, RegistrySettings)

    # The registry dials the drift service where it listens, inside the network.
    assert drift.host == "0.0.0.0", "the drift service must accept the registry container"
    assert registry.analysis_address, "without it canary steps are not judged on the logged events"
    assert host_port(registry.analysis_address) == ("drift", drift.port)
    assert str(drift.port) in [str(port) for port in drift_svc.get("expose") or []]
    assert depends_on(service(compose, "registry")).get("drift") == "service_healthy"

    # One store: drift reads the tables the logger writes, on the same server and database.
    assert drift.clickhouse_dsn == logger.clickhouse_dsn
    assert urlparse(drift.clickhouse_dsn).scheme == "http", "embedded chdb cannot be shared between containers"

    # One broker, same topic names: the logger stores the alerts drift publishes.
    assert drift.kafka.bootstrap_servers == logger.kafka.bootstrap_servers
    assert drift.kafka.alerts_topic == logger.kafka.alerts_topic
    assert drift.kafka.topics == logger.kafka.topics
    assert logger.consume_alerts, "the logger would not store drift's alerts"
