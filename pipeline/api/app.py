"""The FastAPI application: `create_app()` builds it, `run_server()` serves it with uvicorn.

The lifespan loads the model (and stage adapters), the index and the conversation store once; requests only
read them. Without API keys the server refuses to bind beyond loopback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from pipeline.answer import AnswerService
from pipeline.api.errors import install_error_handlers
from pipeline.api.logs import configure_logging
from pipeline.api.metrics import ApiMetrics
from pipeline.api.routers import chat, completions, conversations, models, ops, web
from pipeline.api.security import BodySizeLimit, KeyRing, RateLimiter
from pipeline.api.settings import ServeConfig, is_loopback
from pipeline.service import build_service, serve_config
from pipeline.upstream import UpstreamError
from raglora.errors import RagloraError

log = logging.getLogger("raglora.api")

_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


def _route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/v1/conversations/"):
        return "/v1/conversations/{id}"
    return "other"


class AccessLog:
    """Pure ASGI middleware (does not buffer streams): request metrics and one JSON log line per request."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        route = _route_label(scope.get("path", ""))
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(scope.get("method", ""), route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            if route not in ("/metrics", "/health"):
                log.info(
                    "request",
                    extra={
                        "event": "request",
                        "method": scope.get("method"),
                        "route": route,
                        "status": status["code"],
                        "ms": round(elapsed * 1000, 2),
                        "key_id": scope.get("state", {}).get("key_id"),
                    },
                )


def check_bind(serve: ServeConfig, host: str | None = None) -> list[str]:
    """The API keys to enforce; RagloraError when there are none and the host is not loopback."""
    host = host or serve.host
    keys = serve.resolved_api_keys()
    if not keys and not is_loopback(host):
        raise RagloraError(
            f"refusing to serve on {host} without API keys: set serve.api_keys or RAGLORA_API_KEYS "
            "(comma-separated), or bind to 127.0.0.1"
        )
    return keys


def create_app(
    cfg=None,
    *,
    serve: ServeConfig | None = None,
    service: AnswerService | None = None,
    service_factory: Callable[[], AnswerService] | None = None,
    configure_logs: bool = True,
) -> FastAPI:
    """Build the app. The model/index load in the lifespan (`build_service(cfg)`), unless a ready `service`
    (not closed at shutdown) or a `service_factory` (closed at shutdown) is given — tests use those.

    `cfg` is the root `pipeline.config.Config`; `serve` overrides `cfg.serve`.
    """
    serve = serve or (serve_config(cfg) if cfg is not None else ServeConfig())
    keys = check_bind(serve)
    if service is None and service_factory is None and cfg is None:
        raise RagloraError("create_app needs a config (or a service) to load the model from")
    if configure_logs:
        configure_logging(serve.log_level)
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not keys:
            log.warning(
                "no API keys configured: serving without authentication on loopback only",
                extra={"event": "no_auth"},
            )
        owned = service is None
        if service is not None:
            svc = service
        elif service_factory is not None:
            svc = await asyncio.to_thread(service_factory)
        else:
            svc = await asyncio.to_thread(build_service, cfg, serve=serve)
        svc.generator.on_batch = metrics.observe_batch
        app.state.service = svc
        metrics.ready.set(1)
        log.info(
            "ready",
            extra={"event": "ready", "models": svc.model_names(), "index": svc.index is not None, "auth": bool(keys)},
        )
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for in-flight requests; drain the generator, close the DB.
            metrics.ready.set(0)
            app.state.service = None
            if owned:
                await asyncio.to_thread(svc.close)
            log.info("stopped", extra={"event": "stopped"})

    app = FastAPI(
        title="raglora",
        version="0.1.0",
        description="Customer-service assistant: retrieval-augmented answers from LoRA-tuned stages.",
        lifespan=lifespan,
    )
    app.state.settings = serve
    app.state.metrics = metrics
    app.state.keyring = KeyRing(keys)
    app.state.rate_limiter = RateLimiter(serve.rate_limit_per_minute)
    app.state.service = None
    install_error_handlers(app)

    @app.exception_handler(UpstreamError)
    async def _upstream(request, exc: UpstreamError):
        # The generation engine (serve.generator: openai) failed: 502 down/garbage, 504 timeout; nothing was stored.
        error = {"message": str(exc), "type": "server_error", "code": exc.code, "param": None}
        return JSONResponse({"error": error}, status_code=exc.status)

    for router in (chat.router, completions.router, models.router, conversations.router, ops.router, web.router):
        app.include_router(router)
    if serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=serve.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Conversation-Id"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=serve.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics)
    return app


def run_server(cfg, *, host: str | None = None, port: int | None = None, serve: ServeConfig | None = None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get `graceful_shutdown_s` to finish."""
    import uvicorn

    serve = serve or serve_config(cfg)
    updates = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if updates:
        serve = serve.model_copy(update=updates)
    app = create_app(cfg, serve=serve)
    uvicorn.run(
        app,
        host=serve.host,
        port=serve.port,
        log_level=serve.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=serve.graceful_shutdown_s,
    )
