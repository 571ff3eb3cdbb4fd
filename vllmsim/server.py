"""The HTTP face of the simulator: vLLM's OpenAI routes, runtime LoRA API, metrics, and the ``/sim/`` control API.

One asyncio task steps the engine; request handlers only queue work and wait on one future each, so the
per-request cost stays small when a router drives thousands of requests per second through it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import metrics
from .config import ConfigError, FaultSettings, SimConfig
from .engine import FINISHED, RUNNING, Engine, EngineParams, Request

log = logging.getLogger("vllmsim")

JSON = "application/json"
_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "bright",
    "stars", "watch", "from", "far", "above", "and", "every", "small", "river", "runs", "toward", "one",
    "wide", "calm", "sea", "under", "morning", "light",
]  # fmt: skip
_TOKEN_TEXT = [" " + w for w in _WORDS]
_TOKEN_JSON = [orjson.dumps(t) for t in _TOKEN_TEXT]
_CYCLE_TEXT = "".join(_TOKEN_TEXT)
_RANK_RE = re.compile(r"(?i)(?:^|[/_.\-])rank[-_=]?(\d+)(?=$|[/_.\-])")
DEFAULT_RANK = 8
VERSION = "0.32.0"
MIN_SLEEP = 0.001
"""Real seconds below which the engine loop yields instead of sleeping (timer resolution)."""


def text_for(start: int, end: int) -> str:
    """Deterministic output text of tokens ``start..end-1``."""
    n = len(_TOKEN_TEXT)
    if end - start <= 4:
        return "".join(_TOKEN_TEXT[i % n] for i in range(start, end))
    full, rest = divmod(end - start, n)
    if start % n == 0:
        return _CYCLE_TEXT * full + "".join(_TOKEN_TEXT[:rest])
    return "".join(_TOKEN_TEXT[i % n] for i in range(start, end))


def rank_from_path(path: str) -> int:
    """Rank of an adapter whose path does not exist on disk: a ``rank-N`` segment, else 8 (see README)."""
    found = _RANK_RE.findall(path)
    return int(found[-1]) if found else DEFAULT_RANK


def probe_adapter(path: str, check_paths: bool) -> int | tuple[int, str]:
    """Rank of the adapter at ``path``, or (status, reason) as vLLM would fail the load.

    A path on disk needs adapter_config.json with an integer ``r``; a path that does not exist is a symbolic
    source (rank from its ``rank-N`` part) unless ``check_paths``.
    """
    if not os.path.exists(path):
        if check_paths:
            return 404, f"No adapter found for {path}"
        return rank_from_path(path)
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        return 404, f"No adapter found for {path}"
    try:
        with open(cfg_path, "rb") as fh:
            data = orjson.loads(fh.read())
    except (OSError, orjson.JSONDecodeError) as exc:
        return 500, f"invalid adapter_config.json: {exc}"
    r = data.get("r") if isinstance(data, dict) else None
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return 500, "adapter_config.json has no valid 'r'"
    return r


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    """vLLM's OpenAI-style error object."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_response(message: str, type_: str, code: int, param: str | None = None) -> web.Response:
    """An error answer shaped exactly like vLLM's."""
    return web.Response(status=code, body=error_body(message, type_, code, param), content_type=JSON)


def _bad_json() -> web.Response:
    return error_response(
        "[{'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON decode error', "
        "'input': {}, 'ctx': {'error': 'Expecting value'}}]",
        "Bad Request",
        400,
    )


def _missing_field(field: str) -> web.Response:
    return error_response(
        f"[{{'type': 'missing', 'loc': ('body', '{field}'), 'msg': 'Field required'}}]",
        "Bad Request",
        400,
        f"body.{field}",
    )


def _bad_field(field: str, msg: str) -> web.Response:
    return error_response(
        f"[{{'type': 'value_error', 'loc': ('body', '{field}'), 'msg': {msg!r}}}]",
        "Bad Request",
        400,
        f"body.{field}",
    )


class InvalidRequest(Exception):
    """A request body vLLM would refuse with 400."""

    def __init__(self, response: web.Response) -> None:
        super().__init__()
        self.response = response


@dataclass
class AdapterEntry:
    """A name in the API server's registry (what ``/v1/models`` lists)."""

    name: str
    path: str
    rank: int
    created: int
    startup: bool


class SimState:
    """Everything a restart forgets: engine, registry, counters, event log."""

    def __init__(self, config: SimConfig, wall_now: float) -> None:
        c = config
        self.engine = Engine(
            EngineParams(
                max_num_seqs=c.max_num_seqs,
                max_loras=c.max_loras,
                max_cpu_loras=c.cpu_lora_slots,
                step_time=c.step_time,
                per_seq_step_time=c.per_seq_step_time,
                prefill_time_per_token=c.prefill_time_per_token,
                load_time=c.load_time,
                kv_cache_tokens=c.kv_cache_tokens,
            )
        )
        self.registry: dict[str, AdapterEntry] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=max(1, c.max_events))
        self.seq = 0
        self.model_not_found = 0
        self.not_found_by_model: dict[str, int] = {}
        self.requests_by_model: dict[str, int] = {}
        self.completed_by_model: dict[str, int] = {}
        self.aborted_by_model: dict[str, int] = {}
        self.errors_injected = 0
        self.loads_ok = 0
        self.loads_failed = 0
        self.unloads = 0
        for mod in c.lora_modules:
            found = probe_adapter(mod.path, c.check_paths)
            if not isinstance(found, int):
                raise ConfigError(f"--lora-modules {mod.name}={mod.path}: {found[1]}")
            if found > c.max_lora_rank:
                raise ConfigError(
                    f"--lora-modules {mod.name}: LoRA rank {found} is greater than max_lora_rank {c.max_lora_rank}"
                )
            if mod.name in c.served_names:
                raise ConfigError(f"--lora-modules {mod.name}: conflicts with a served base model")
            self.registry[mod.name] = AdapterEntry(mod.name, mod.path, found, int(wall_now), True)
            self.engine.cache_adapter(mod.name)


class Simulator:
    """One simulated vLLM replica, startable and stoppable inside a running event loop.

    ``exit_on_crash`` decides what an injected crash does: exit the process (the command line) or stop this
    server abruptly and set ``crashed`` (in-process use); ``start()`` afterwards is a restart that forgets
    runtime-loaded adapters, as a restarted vLLM pod does.
    """

    def __init__(self, config: SimConfig, *, exit_on_crash: bool = False) -> None:
        config.validate()
        self.config = config
        self.exit_on_crash = exit_on_crash
        self.faults = FaultSettings(**vars(config.faults))
        self.faults.load_failures_by_adapter = dict(config.faults.load_failures_by_adapter)
        self._rng = random.Random(config.seed)
        self._served = set(config.served_names)
        self._base = config.base_name
        self._aliases = ", ".join(config.served_names)
        self._scale = config.time_scale
        self._id_prefix = f"{random.getrandbits(32):08x}"
        self._next_id = 0
        self._mono0 = time.monotonic()
        self._wall0 = time.time()
        self.state = SimState(config, self._wall0)
        self._runner: web.AppRunner | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._virtual = 0.0
        self.port = config.port
        self.host = config.host
        self.crashed: asyncio.Event | None = None
        self.generation = 0

    # ---- clocks ---------------------------------------------------------------------------------------
    def sim_now(self) -> float:
        """Simulated seconds since start: real elapsed time times the time scale."""
        return (time.monotonic() - self._mono0) * self._scale

    def wall_of(self, sim_t: float) -> float:
        """Unix time at which the simulated instant happened (metrics carry real timestamps)."""
        return self._wall0 + sim_t / self._scale

    @property
    def url(self) -> str:
        """Base URL clients use (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and serve; a second start after a stop or crash is a restart with fresh state."""
        if self._runner is not None:
            raise RuntimeError("simulator already running")
        if self.generation > 0:
            self._mono0 = time.monotonic()
            self._wall0 = time.time()
            self._virtual = 0.0
            self.state = SimState(self.config, self._wall0)
            self.faults = FaultSettings(**vars(self.config.faults))
            self.faults.load_failures_by_adapter = dict(self.config.faults.load_failures_by_adapter)
        self.generation += 1
        self.crashed = asyncio.Event()
        self._wake = asyncio.Event()
        app = self._build_app()
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        try:
            sock = _bind(self.host, self.port)
            self.port = sock.getsockname()[1]
            site = web.SockSite(runner, sock, backlog=2048)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._engine_task = asyncio.get_running_loop().create_task(self._engine_loop())
        self._event("start", generation=self.generation, port=self.port)
        log.info("vLLM simulator serving %s on %s (max_loras=%d)", self._base, self.url, self.config.max_loras)

    async def stop(self) -> None:
        """Stop serving; in-flight requests are cut off."""
        task, self._engine_task = self._engine_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._fail_pending()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def crash(self) -> None:
        """Injected crash: exit the process, or (in-process) stop abruptly and flag ``crashed``."""
        self._event("crash", exit_code=self.faults.crash_exit_code)
        if self.exit_on_crash:
            log.error("simulated crash: exiting with code %d", self.faults.crash_exit_code)
            logging.shutdown()
            os._exit(self.faults.crash_exit_code)
        await self.stop()
        if self.crashed is not None:
            self.crashed.set()

    def _fail_pending(self) -> None:
        eng = self.state.engine
        for req in [*eng.running.values(), *eng.waiting]:
            h = req.handle
            if isinstance(h, asyncio.Future) and not h.done():
                h.cancel()

    # ---- engine loop ----------------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        """The single task that steps the batch (no task per request or per token).

        Steps follow modelled time exactly: a step starts when the previous one ends (or when work arrives
        after idling) and the loop sleeps only once it is at least ``MIN_SLEEP`` of real time ahead, so steps
        shorter than the timer resolution (high time scales) are run back to back instead of stretched.
        """
        assert self._wake is not None
        wake = self._wake
        scale = self._scale
        sleep = asyncio.sleep
        while True:
            eng = self.state.engine
            if not eng.has_work():
                wake.clear()
                await wake.wait()
                continue
            start = max(self._virtual, self.sim_now())
            dur = eng.start_step(start)
            end = start + dur
            lead = (end - self.sim_now()) / scale
            await sleep(lead if lead >= MIN_SLEEP else 0)
            self._virtual = end
            res = eng.complete_step(end)
            for req in res.tokens:
                h = req.handle
                if h is not None and not h.done():
                    h.set_result(None)
            if res.finished:
                done = self.state.completed_by_model
                for req in res.finished:
                    h = req.handle
                    if h is not None and not h.done():
                        h.set_result(None)
                    m = req.adapter or self._base
                    done[m] = done.get(m, 0) + 1

    # ---- helpers --------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        st = self.state
        st.seq += 1
        ev = {"seq": st.seq, "time": time.time(), "kind": kind, **fields}
        st.events.append(ev)
        return ev

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _build_app(self) -> web.Application:
        mws = [self._auth_middleware] if self.config.api_keys else []
        app = web.Application(middlewares=mws, client_max_size=16 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_get("/v1/models", self._models)
        r.add_get("/health", self._health)
        r.add_get("/metrics", self._metrics)
        r.add_get("/version", self._version)
        if self.config.allow_runtime_lora_updating:
            r.add_post("/v1/load_lora_adapter", self._load)
            r.add_post("/v1/unload_lora_adapter", self._unload)
        r.add_get("/sim/events", self._sim_events)
        r.add_get("/sim/state", self._sim_state)
        r.add_get("/sim/faults", self._sim_faults_get)
        r.add_post("/sim/faults", self._sim_faults_post)
        r.add_delete("/sim/faults", self._sim_faults_reset)
        r.add_post("/sim/crash", self._sim_crash)
        self._allowed: dict[str, set[str]] = {}
        for res in r.resources():
            info = res.get_info()
            path = info.get("path") or info.get("formatter")
            if path:
                self._allowed.setdefault(path, set()).update(route.method for route in res)
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """vLLM's ``--api-key``: routes under /v1 need ``Authorization: Bearer <key>``."""
        if request.path.startswith("/v1"):
            auth = request.headers.get("Authorization", "")
            if not any(auth == f"Bearer {k}" for k in self.config.api_keys):
                return web.Response(status=401, body=b'{"error":"Unauthorized"}', content_type=JSON)
        resp: web.StreamResponse = await handler(request)
        return resp

    async def _not_found(self, request: web.Request) -> web.Response:
        allowed = self._allowed.get(request.path)
        if allowed and request.method not in allowed:
            return web.Response(status=405, body=b'{"detail":"Method Not Allowed"}', content_type=JSON)
        return web.Response(status=404, body=b'{"detail":"Not Found"}', content_type=JSON)

    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        raw = await request.read()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest(_bad_json()) from None

    # ---- simple routes --------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        if self.faults.unhealthy:
            return web.Response(status=503)
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"version": VERSION}), content_type=JSON)

    async def _models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        data = [
            _model_card(name, self.config.model, None, created, self.config.max_model_len or 2048)
            for name in self.config.served_names
        ]
        data.extend(_model_card(e.name, e.path, self._base, created, None) for e in self.state.registry.values())
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON)

    async def _metrics(self, request: web.Request) -> web.Response:
        text = metrics.render(self)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # ---- runtime LoRA API -----------------------------------------------------------------------------
    async def _load(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
        except InvalidRequest as exc:
            return exc.response
        if not isinstance(body, dict):
            return _bad_field("lora_name", "Input should be a valid dictionary")
        name = body.get("lora_name")
        path = body.get("lora_path")
        if name is None:
            return _missing_field("lora_name")
        if path is None:
            return _missing_field("lora_path")
        if not isinstance(name, str):
            return _bad_field("lora_name", "Input should be a valid string")
        if not isinstance(path, str):
            return _bad_field("lora_path", "Input should be a valid string")
        inplace = body.get("load_inplace", False)
        if not isinstance(inplace, bool):
            return _bad_field("load_inplace", "Input should be a valid boolean")
        result = await self._do_load(name, path, inplace)
        st = self.state
        ok = result.status == 200
        if ok:
            st.loads_ok += 1
        else:
            st.loads_failed += 1
        ev = self._event(
            "load",
            adapter=name,
            path=path,
            inplace=inplace,
            status=result.status,
            in_flight=st.engine.in_flight_by_adapter.get(name, 0),
        )
        if not ok and isinstance(result.body, bytes):
            ev["error"] = orjson.loads(result.body)["error"]["message"]
        return result

    async def _do_load(self, name: str, path: str, inplace: bool) -> web.Response:
        cfg = self.config
        if not cfg.enable_lora:
            return error_response(
                "LoRA is not enabled on this server (start with --enable-lora).", "BadRequestError", 400
            )
        if not name or not path:
            return error_response("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name in self._served:
            return error_response(
                f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput", 400
            )
        st = self.state
        if name in st.registry and not inplace:
            return error_response(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                "place, set 'load_inplace' to True.",
                "InvalidUserInput",
                400,
            )
        f = self.faults
        delay = (cfg.load_time + f.load_delay) / self._scale
        per = f.load_failures_by_adapter.get(name, 0)
        if per > 0 or f.load_failures > 0:
            if per > 0:
                f.load_failures_by_adapter[name] = per - 1
            else:
                f.load_failures -= 1
            await asyncio.sleep(delay)
            return error_response(f"Loading lora {name} failed: simulated load failure", "InternalServerError", 500)
        rank_or_error = self._adapter_rank(name, path)
        if isinstance(rank_or_error, web.Response):
            return rank_or_error
        rank = rank_or_error
        if rank > cfg.max_lora_rank:
            await asyncio.sleep(delay)
            return error_response(
                f"Loading lora {name} failed: LoRA rank {rank} is greater than max_lora_rank {cfg.max_lora_rank}.",
                "InternalServerError",
                500,
            )
        await asyncio.sleep(delay)
        if self.state is not st:  # restarted meanwhile
            return error_response("server restarted during load", "InternalServerError", 500)
        if name in st.registry and not inplace:
            return error_response(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                "place, set 'load_inplace' to True.",
                "InvalidUserInput",
                400,
            )
        old = st.registry.get(name)
        if old is not None:
            st.engine.uncache_adapter(name)
        st.registry[name] = AdapterEntry(name, path, rank, int(time.time()), old.startup if old else False)
        for victim in st.engine.cache_adapter(name):
            self._event("evict", adapter=victim)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.", content_type="text/plain")

    def _adapter_rank(self, name: str, path: str) -> int | web.Response:
        """The adapter's rank, or vLLM's error answer for a path it cannot load."""
        found = probe_adapter(path, self.config.check_paths)
        if isinstance(found, int):
            return found
        status, detail = found
        kind = "NotFoundError" if status == 404 else "InternalServerError"
        return error_response(f"Loading lora {name} failed: {detail}", kind, status)

    async def _unload(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
        except InvalidRequest as exc:
            return exc.response
        if not isinstance(body, dict):
            return _bad_field("lora_name", "Input should be a valid dictionary")
        name = body.get("lora_name")
        if name is None:
            return _missing_field("lora_name")
        if not isinstance(name, str):
            return _bad_field("lora_name", "Input should be a valid string")
        st = self.state
        in_flight = st.engine.in_flight_by_adapter.get(name, 0)
        if name not in st.registry:
            self._event("unload", adapter=name, status=404, in_flight=in_flight)
            return error_response(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del st.registry[name]
        st.unloads += 1
        self._event("unload", adapter=name, status=200, in_flight=in_flight)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.", content_type="text/plain")

    # ---- inference ------------------------------------------------------------------------------------
    def _resolve_model(self, model: Any) -> tuple[str | None, str] | web.Response:
        """(adapter or None, name to echo), or the 404 vLLM gives for a model it does not serve."""
        if model is None:
            return None, self._base
        if not isinstance(model, str):
            return _bad_field("model", "Input should be a valid string")
        if model in self._served:
            return None, model
        if model in self.state.registry:
            return model, model
        st = self.state
        st.model_not_found += 1
        st.not_found_by_model[model] = st.not_found_by_model.get(model, 0) + 1
        if self.config.log_requests:
            self._event("request", model=model, status=404)
        return error_response(
            f"The model `{model}` does not exist. Valid aliases: {self._aliases}.", "NotFoundError", 404, "model"
        )

    async def _admission_faults(self, model: str) -> web.Response | None:
        """Injected crash and 5xx answers, decided after the model check like a real engine failure."""
        f = self.faults
        if f.crash_after_requests > 0:
            f.crash_after_requests -= 1
            if f.crash_after_requests == 0:
                asyncio.get_running_loop().create_task(self.crash())
                await asyncio.sleep(3600)  # the connection dies with the server
        inject = False
        if f.error_count > 0:
            f.error_count -= 1
            inject = True
        elif f.error_rate > 0 and self._rng.random() < f.error_rate:
            inject = True
        if inject:
            self.state.errors_injected += 1
            if self.config.log_requests:
                self._event("request", model=model, status=f.error_status)
            return error_response(
                "simulated engine failure",
                "InternalServerError" if f.error_status >= 500 else "BadRequestError",
                f.error_status,
            )
        return None

    def _max_tokens(self, body: dict[str, Any], chat: bool, prompt_tokens: int) -> int:
        value = body.get("max_completion_tokens") if chat else None
        if value is None:
            value = body.get("max_tokens")
        if value is None:
            value = 16
        field = "max_tokens"
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest(_bad_field(field, "Input should be a valid integer"))
        if value < 1:
            raise InvalidRequest(
                error_response(f"max_tokens must be at least 1, got {value}.", "BadRequestError", 400, field)
            )
        limit = self.config.max_model_len
        if limit is not None and prompt_tokens + value > limit:
            raise InvalidRequest(
                error_response(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{value} output tokens and your prompt contains at least {prompt_tokens} input tokens, "
                    f"for a total of at least {prompt_tokens + value} tokens. Please reduce the length of "
                    "the input prompt or the number of requested output tokens.",
                    "BadRequestError",
                    400,
                    "max_tokens",
                )
            )
        return value

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await self._json_body(request)
            if not isinstance(body, dict):
                raise InvalidRequest(_bad_field("body", "Input should be a valid dictionary"))
            prompt_tokens = _chat_tokens(body) if chat else _prompt_tokens(body)
            resolved = self._resolve_model(body.get("model"))
            if isinstance(resolved, web.Response):
                return resolved
            max_tokens = self._max_tokens(body, chat, prompt_tokens)
            n = body.get("n", 1)
            if n != 1:
                raise InvalidRequest(error_response("the simulator serves n=1 only", "BadRequestError", 400, "n"))
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise InvalidRequest(_bad_field("stream", "Input should be a valid boolean"))
        except InvalidRequest as exc:
            return exc.response
        adapter, echo = resolved
        fault = await self._admission_faults(echo)
        if fault is not None:
            return fault
        st = self.state
        st.requests_by_model[echo] = st.requests_by_model.get(echo, 0) + 1
        if self.config.log_requests:
            self._event("request", model=echo, status=200)
        eng = st.engine
        loop = asyncio.get_running_loop()
        rid = self._new_id()
        req = Request(rid, adapter, prompt_tokens, max_tokens, stream=stream, handle=loop.create_future())
        eng.add_request(req, self.sim_now())
        wake = self._wake
        if wake is not None and not wake.is_set():
            wake.set()
        created = int(time.time())
        rid_text = f"{'chatcmpl' if chat else 'cmpl'}-{self._id_prefix}{rid:08x}"
        try:
            if stream:
                include_usage = _include_usage(body)
                return await self._stream(
                    request, req, rid_text, model=echo, created=created, chat=chat, include_usage=include_usage
                )
            fut = req.handle
            assert isinstance(fut, asyncio.Future)
            await fut
            return self._plain(req, rid_text, echo, created, chat)
        finally:
            if req.state != FINISHED:
                eng.abort(req, self.sim_now())
                if self.state is st:
                    m = st.aborted_by_model
                    m[echo] = m.get(echo, 0) + 1

    def _plain(self, req: Request, rid: str, model: str, created: int, chat: bool) -> web.Response:
        text = text_for(0, req.max_tokens)
        usage = {
            "prompt_tokens": req.prompt_tokens,
            "total_tokens": req.prompt_tokens + req.max_tokens,
            "completion_tokens": req.max_tokens,
            "prompt_tokens_details": None,
        }
        if chat:
            out: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "tool_calls": [],
                            "reasoning_content": None,
                        },
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "prompt_logprobs": None,
                "kv_transfer_params": None,
            }
        else:
            out = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": None,
            }
        return web.Response(body=orjson.dumps(out), content_type=JSON)

    async def _stream(
        self,
        request: web.Request,
        req: Request,
        rid: str,
        *,
        model: str,
        created: int,
        chat: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        head = (
            b'data: {"id":"'
            + rid.encode()
            + (b'","object":"chat.completion.chunk","created":' if chat else b'","object":"text_completion","created":')
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":[{"index":0,'
        )
        if chat:
            await resp.write(
                head + b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
            )
            open_tok = b'"delta":{"content":'
            mid = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            last = b'},"logprobs":null,"finish_reason":"length","stop_reason":null}],"system_fingerprint":null}\n\n'
        else:
            open_tok = b'"text":'
            mid = (
                b',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
                b'"token_ids":null}]}\n\n'
            )
            last = (
                b',"logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,'
                b'"token_ids":null}],"system_fingerprint":null}\n\n'
            )
        eng = self.state.engine
        loop = asyncio.get_running_loop()
        sent = 0
        total = req.max_tokens
        nwords = len(_TOKEN_JSON)
        while True:
            have = eng.tokens_of(req) if req.state in (RUNNING, FINISHED) else 0
            if have > sent:
                parts = []
                for i in range(sent, have):
                    parts.append(head)
                    parts.append(open_tok)
                    parts.append(_TOKEN_JSON[i % nwords])
                    parts.append(last if i == total - 1 else mid)
                sent = have
                await resp.write(b"".join(parts))
            if sent >= total:
                break
            fut = loop.create_future()
            req.handle = fut
            await fut
        if include_usage:
            usage = orjson.dumps(
                {
                    "prompt_tokens": req.prompt_tokens,
                    "total_tokens": req.prompt_tokens + total,
                    "completion_tokens": total,
                }
            )
            await resp.write(
                b'data: {"id":"'
                + rid.encode()
                + (b'","object":"chat.completion.chunk"' if chat else b'","object":"text_completion"')
                + b',"created":'
                + str(created).encode()
                + b',"model":'
                + orjson.dumps(model)
                + b',"choices":[],"usage":'
                + usage
                + b"}\n\n"
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # ---- /sim/ control API ----------------------------------------------------------------------------
    async def _sim_events(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.Response(status=400, text="since must be an integer")
        st = self.state
        events = [e for e in st.events if e["seq"] > since]
        return web.Response(body=orjson.dumps({"events": events, "counters": self.counters()}), content_type=JSON)

    def counters(self) -> dict[str, Any]:
        """Counters tests read to check a router's and a controller's behaviour."""
        st = self.state
        return {
            "generation": self.generation,
            "model_not_found": st.model_not_found,
            "not_found_by_model": dict(st.not_found_by_model),
            "requests_by_model": dict(st.requests_by_model),
            "completed_by_model": dict(st.completed_by_model),
            "aborted_by_model": dict(st.aborted_by_model),
            "in_flight_by_adapter": dict(st.engine.in_flight_by_adapter),
            "errors_injected": st.errors_injected,
            "loads_ok": st.loads_ok,
            "loads_failed": st.loads_failed,
            "unloads": st.unloads,
            "adapter_reloads": st.engine.stats.adapter_reloads,
        }

    async def _sim_state(self, request: web.Request) -> web.Response:
        st = self.state
        out = {
            "engine": st.engine.snapshot(),
            "adapters": {n: {"path": e.path, "rank": e.rank, "startup": e.startup} for n, e in st.registry.items()},
            "faults": self.faults.to_dict(),
            "generation": self.generation,
            "config": {
                "model": self.config.model,
                "served_model_names": self.config.served_names,
                "max_loras": self.config.max_loras,
                "max_cpu_loras": self.config.cpu_lora_slots,
                "max_lora_rank": self.config.max_lora_rank,
                "max_num_seqs": self.config.max_num_seqs,
                "time_scale": self.config.time_scale,
                "runtime_lora_updating": self.config.allow_runtime_lora_updating,
            },
        }
        return web.Response(body=orjson.dumps(out), content_type=JSON)

    async def _sim_faults_get(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.faults.to_dict()), content_type=JSON)

    async def _sim_faults_post(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
        except InvalidRequest as exc:
            return exc.response
        if not isinstance(body, dict):
            return error_response("faults must be a JSON object", "BadRequestError", 400)
        trial = FaultSettings(**vars(self.faults))
        trial.load_failures_by_adapter = dict(self.faults.load_failures_by_adapter)
        try:
            trial.update(body)
        except ValueError as exc:
            return error_response(str(exc), "BadRequestError", 400)
        self.faults = trial
        self._event("faults", settings={k: v for k, v in body.items()})
        if body.get("crash") is True:
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.crash()))
        return web.Response(body=orjson.dumps(self.faults.to_dict()), content_type=JSON)

    async def _sim_faults_reset(self, request: web.Request) -> web.Response:
        self.faults = FaultSettings()
        self._event("faults", settings="reset")
        return web.Response(body=orjson.dumps(self.faults.to_dict()), content_type=JSON)

    async def _sim_crash(self, request: web.Request) -> web.Response:
        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.crash()))
        return web.Response(body=b'{"crashing":true}', content_type=JSON)


def _model_card(name: str, root: str, parent: str | None, created: int, max_len: int | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
        "permission": [
            {
                "id": f"modelperm-{name}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


def _count_words(text: str) -> int:
    return max(1, len(text.split()))


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a completion request: words of a text prompt, length of a token-id list."""
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest(_missing_field("prompt"))
    if isinstance(prompt, str):
        return _count_words(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return len(prompt)
        if len(prompt) == 1:
            one = prompt[0]
            if isinstance(one, str):
                return _count_words(one)
            if isinstance(one, list) and one and all(isinstance(t, int) for t in one):
                return len(one)
        if all(isinstance(p, str) for p in prompt):
            raise InvalidRequest(
                error_response("the simulator serves one prompt per request", "BadRequestError", 400, "prompt")
            )
    raise InvalidRequest(_bad_field("prompt", "Input should be a string, a list of token ids or a list of one"))


def _chat_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat request: words of every message plus a few template tokens per message."""
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest(_missing_field("messages"))
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(_bad_field("messages", "Input should be a non-empty list"))
    total = 0
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(_bad_field("messages", "each message needs a string 'role'"))
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
        total += 4
    return total


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so port 0 yields a free port the caller can read."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
