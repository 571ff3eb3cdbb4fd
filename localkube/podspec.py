"""From a pod written for vLLM to the command line of a vLLM simulator: pure translation.

The test kubelet runs `python -m vllmsim <the vLLM flags> --host 127.0.0.x --port P` for a pod whose
first container runs vLLM in any of the usual ways:

- `vllm serve MODEL [flags]` (command and args split anywhere between the two fields);
- `python3 -m vllm.entrypoints.openai.api_server --model MODEL [flags]`;
- only `args` (the vllm/vllm-openai image's entrypoint is the api_server);
- `sh -c "... vllm serve MODEL [flags]"`;
- `python -m vllmsim [flags]` or `vllm-sim [flags]` (the simulator itself).

Kubernetes' `$(VAR)` references in command, args and env values are expanded as the kubelet does.
Secrets and ConfigMaps are read through callbacks, so this module stays free of I/O.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = 8000
SIM_ARGS_ANNOTATION = "localkube.lora-autoscaler.io/sim-args"
"""Extra simulator flags for one pod (shell-quoted), e.g. `--sim-load-time 0.5`."""

Obj = Mapping[str, Any]
Lookup = Callable[[str, str], Mapping[str, str] | None]
"""(namespace, name) -> the object's data (decoded strings), or None when it does not exist."""

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_SHELLS = {"sh", "bash", "ash", "dash", "zsh"}
_SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
_VLLM_MODULES = {"vllm.entrypoints.openai.api_server", "vllm.entrypoints.api_server"}


class PodSpecError(ValueError):
    """The pod cannot be run; `reason` is what a kubelet puts in the container's waiting state."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SimulatorCommand:
    """What to run for a pod: the simulator's flags (without host and port), the port, the env."""

    vllm_flags: tuple[str, ...]
    port: int
    env: Mapping[str, str]

    def argv(self, python: str, host: str) -> list[str]:
        """The full command line of the simulator bound to `host`."""
        return [python, "-m", "vllmsim", *self.vllm_flags, "--host", host, "--port", str(self.port)]


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, unknown ones kept, `$$` escapes `$`."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _VAR_REF.sub(repl, text)


def _basename(token: str) -> str:
    return token.rsplit("/", 1)[-1]


def _is_python(token: str) -> bool:
    return re.fullmatch(r"python(3(\.\d+)?)?", _basename(token)) is not None


def vllm_flags(argv: Sequence[str], *, from_entrypoint: bool = False) -> list[str]:
    """The vLLM flags (model included) inside a container's command line; PodSpecError if it is not vLLM.

    `from_entrypoint` means the container gave only `args`: the image's entrypoint is vLLM's server.
    """
    tokens = list(argv)
    if from_entrypoint:
        if tokens and tokens[0] == "serve":
            return tokens[1:]
        try:
            return vllm_flags(tokens)
        except PodSpecError:
            return tokens  # flags (and maybe a positional model) for the image's vLLM entrypoint
    if len(tokens) >= 3 and _basename(tokens[0]) in _SHELLS and tokens[1] in ("-c", "-lc", "-ec"):
        return _flags_in_shell_script(tokens[2])
    if tokens and _basename(tokens[0]) == "vllm":
        if len(tokens) >= 2 and tokens[1] == "serve":
            return tokens[2:]
        raise PodSpecError("UnsupportedCommand", f"`vllm` without `serve` is not a server: {shlex.join(tokens)}")
    if tokens and _basename(tokens[0]) in ("vllm-sim", "vllmsim"):
        return tokens[1:]
    if len(tokens) >= 3 and _is_python(tokens[0]) and tokens[1] == "-m":
        module = tokens[2]
        if module in _VLLM_MODULES or module == "vllmsim":
            return tokens[3:]
        if module == "vllm.entrypoints.cli.main" and len(tokens) >= 4 and tokens[3] == "serve":
            return tokens[4:]
    raise PodSpecError(
        "UnsupportedCommand",
        "the first container does not run vLLM (expected `vllm serve MODEL ...`, "
        f"`python3 -m vllm.entrypoints.openai.api_server ...` or only args): {shlex.join(tokens) or '(empty)'}",
    )


def _flags_in_shell_script(script: str) -> list[str]:
    try:
        tokens = shlex.split(script, comments=True)
    except ValueError as exc:
        raise PodSpecError("UnsupportedCommand", f"cannot parse the shell script {script!r}: {exc}") from None
    for i in range(len(tokens)):
        head = tokens[i:]
        if head and head[0] == "exec":
            continue
        if not head or not (_basename(head[0]) == "vllm" or _is_python(head[0])):
            continue
        end = next((j for j, tok in enumerate(head) if tok in _SHELL_OPERATORS), len(head))
        try:
            return vllm_flags(head[:end])
        except PodSpecError:
            continue
    raise PodSpecError("UnsupportedCommand", f"no vLLM server command found in the shell script {script!r}")


def split_host_port(flags: Sequence[str]) -> tuple[list[str], int | None]:
    """Remove `--host`/`--port` (the kubelet chooses the host); return the rest and the port if given."""
    rest: list[str] = []
    port: int | None = None
    i = 0
    while i < len(flags):
        tok = flags[i]
        name, eq, inline = tok.partition("=")
        if name in ("--host", "--port"):
            if eq:
                value: str | None = inline
                i += 1
            else:
                value = flags[i + 1] if i + 1 < len(flags) else None
                i += 2
            if name == "--port":
                if value is None or not value.isdigit() or not 0 < int(value) < 65536:
                    raise PodSpecError("CreateContainerConfigError", f"invalid --port value {value!r}")
                port = int(value)
            continue
        rest.append(tok)
        i += 1
    return rest, port


def container_port(container: Obj) -> int | None:
    """The container's serving port: the one named `http` if any, else the first TCP port."""
    ports = [p for p in container.get("ports") or [] if (p.get("protocol") or "TCP") == "TCP"]
    for p in ports:
        if p.get("name") == "http":
            return int(p["containerPort"])
    return int(ports[0]["containerPort"]) if ports else None


def _field_value(pod: Obj, path: str, pod_ip: str, host_ip: str) -> str:
    meta = pod.get("metadata") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName", ""),
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise PodSpecError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


def _from_ref(kind: str, ref: Obj, namespace: str, lookup: Lookup, key: str | None) -> Mapping[str, str] | str | None:
    name = ref.get("name", "")
    optional = bool(ref.get("optional"))
    data = lookup(namespace, name)
    if data is None:
        if optional:
            return None
        raise PodSpecError("CreateContainerConfigError", f'{kind} "{name}" not found')
    if key is None:
        return data
    if key not in data:
        if optional:
            return None
        raise PodSpecError("CreateContainerConfigError", f"couldn't find key {key} in {kind} {namespace}/{name}")
    return data[key]


def container_env(
    pod: Obj,
    container: Obj,
    *,
    secrets: Lookup,
    config_maps: Lookup,
    pod_ip: str,
    host_ip: str,
) -> dict[str, str]:
    """The container's environment as a kubelet builds it: envFrom first, then env in order, `$(VAR)` expanded."""
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            data = _from_ref("secret", source["secretRef"], namespace, secrets, None)
        elif "configMapRef" in source:
            data = _from_ref("configmap", source["configMapRef"], namespace, config_maps, None)
        else:
            continue
        if isinstance(data, Mapping):
            env.update({f"{prefix}{k}": v for k, v in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        value: Mapping[str, str] | str | None
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = _from_ref("secret", ref, namespace, secrets, ref.get("key", ""))
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = _from_ref("configmap", ref, namespace, config_maps, ref.get("key", ""))
        elif "fieldRef" in source:
            value = _field_value(pod, source["fieldRef"].get("fieldPath", ""), pod_ip, host_ip)
        else:
            raise PodSpecError("CreateContainerConfigError", f"env {name}: unsupported valueFrom {sorted(source)}")
        if isinstance(value, str):
            env[name] = value
    return env


def decode_secret_data(secret: Obj) -> dict[str, str]:
    """A Secret's `data` (base64) and `stringData` as text."""
    out = {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def simulator_command(
    pod: Obj,
    *,
    secrets: Lookup,
    config_maps: Lookup,
    pod_ip: str,
    host_ip: str,
) -> SimulatorCommand:
    """Translate the pod's first container into a simulator command; PodSpecError says why it cannot."""
    containers = (pod.get("spec") or {}).get("containers") or []
    if not containers:
        raise PodSpecError("CreateContainerConfigError", "the pod has no containers")
    container = containers[0]
    env = container_env(pod, container, secrets=secrets, config_maps=config_maps, pod_ip=pod_ip, host_ip=host_ip)
    command = [expand(str(t), env) for t in container.get("command") or []]
    args = [expand(str(t), env) for t in container.get("args") or []]
    flags = vllm_flags(command + args, from_entrypoint=not command)
    flags, port = split_host_port(flags)
    annotation = ((pod.get("metadata") or {}).get("annotations") or {}).get(SIM_ARGS_ANNOTATION)
    if annotation:
        try:
            flags += shlex.split(annotation)
        except ValueError as exc:
            raise PodSpecError("CreateContainerConfigError", f"annotation {SIM_ARGS_ANNOTATION}: {exc}") from None
    if port is None:
        port = container_port(container) or DEFAULT_PORT
    return SimulatorCommand(tuple(flags), port, env)
