"""`deit serve`: an HTTP inference server (Azure /score, Open Inference Protocol v2,
/embed, /metrics) with dynamic batching and safe defaults. Needs the `serve` extra."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_UNAVAILABLE, DeiTError, UsageError
from . import output
from .inputs import image_options, load
from .options import (
    DEFAULT_MODEL_NAME,
    AllowTruncatedOpt,
    CropPctOpt,
    DeviceOpt,
    DtypeOpt,
    HeadOpt,
    ModelOpt,
    NoExifOpt,
    QuietOpt,
    ResizeOpt,
    WorkersOpt,
)

INSTALL_HINT = "pip install 'deit-cli[serve]'"


class ServeUnavailable(DeiTError):
    """The server cannot run here: the extra is missing, or the address cannot be listened on."""

    exit_code = EXIT_UNAVAILABLE


def serve(
    model: ModelOpt = DEFAULT_MODEL_NAME,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on. Not loopback: needs --api-key-file (or DEIT_API_KEY), or --insecure."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")] = 8080,
    name: Annotated[str, typer.Option("--name", help="The model's name in /v2/models/{name}.")] = "deit",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model (slower start).")] = False,
    head: HeadOpt = None,
    crop_pct: CropPctOpt = None,
    resize: ResizeOpt = None,
    no_exif: NoExifOpt = False,
    allow_truncated: AllowTruncatedOpt = False,
    max_batch_size: Annotated[
        int, typer.Option("--max-batch-size", min=1, help="Most images per model call; 1 turns batching off.")
    ] = 32,
    max_delay_ms: Annotated[
        float,
        typer.Option(
            "--max-delay-ms",
            min=0.0,
            help="Longest an image waits for others to join its batch (an idle server does not wait).",
        ),
    ] = 5.0,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", min=1, help="Most images waiting; past it a request gets 503 with Retry-After."),
    ] = 256,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="Seconds per request, decode to answer (504 past it).")
    ] = 30.0,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", min=0.001, help="Largest request body, MiB (413).")
    ] = 8.0,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Most images per request (413).")] = 32,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help="File holding the API key; then every route but the probes needs Authorization: Bearer <key>.",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Listen beyond loopback without an API key.")] = False,
    allow_url_hosts: Annotated[
        str | None,
        typer.Option(
            "--allow-url-hosts",
            help="Comma list of host names whose http(s) image URLs may be fetched (default: URL inputs off).",
            show_default=False,
        ),
    ] = None,
    allow_url_network: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-url-network",
            help="A private network (CIDR) URL hosts may resolve into, e.g. 10.1.2.0/24; repeatable.",
            show_default=False,
        ),
    ] = None,
    url_timeout: Annotated[
        float, typer.Option("--url-timeout", min=0.001, help="Seconds per URL download, in all.")
    ] = 10.0,
    url_max_mb: Annotated[float, typer.Option("--url-max-mb", min=0.001, help="Largest URL download, MiB.")] = 50.0,
    max_connections: Annotated[
        int, typer.Option("--max-connections", min=1, help="Most open connections and requests at once; past it: 503.")
    ] = 512,
    workers: WorkersOpt = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request on stderr.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Serve a model over HTTP: Azure /score, Open Inference Protocol v2 (KServe), /embed.

    Requests from all clients are batched together. Binds 127.0.0.1 unless --host says
    otherwise (then an API key is required); URL inputs are off unless --allow-url-hosts
    names hosts. The model is loaded and warmed up before the server reports ready.
    SIGTERM or Ctrl-C: queued requests are answered, then exit 0.
    """
    try:  # the extra, before anything slow
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ServeUnavailable(
            f"deit serve needs the serve extra ({exc.name} is not installed)", INSTALL_HINT
        ) from None

    api_key = _api_key(api_key_file)
    if not _is_loopback(host) and api_key is None and not insecure:
        raise UsageError(
            f"refusing to listen on {host} without an API key",
            "give --api-key-file FILE or set DEIT_API_KEY; --insecure if you mean it",
        )
    if max_images > max_queue:
        raise UsageError(f"--max-images ({max_images}) must not exceed --max-queue ({max_queue})")
    hosts = [h for h in (allow_url_hosts or "").split(",") if h.strip()]
    if allow_url_network and not hosts:
        raise UsageError("--allow-url-network needs --allow-url-hosts")
    options = image_options(max_batch_size, workers, crop_pct, resize, no_exif, allow_truncated)

    from ..serve.app import Settings
    from ..serve.urls import UrlPolicy

    try:
        policy = UrlPolicy.from_flags(
            hosts, allow_url_network or (), timeout=url_timeout, max_bytes=int(url_max_mb * 2**20)
        )
    except ValueError as exc:
        raise UsageError(f"--allow-url-network: {exc}") from None
    settings = Settings(
        name=name,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        timeout=timeout,
        max_body_bytes=int(max_body_mb * 2**20),
        max_images=max_images,
        api_key=api_key,
        urls=policy,
        decode_workers=max(1, workers if workers is not None else min(8, os.cpu_count() or 1)),
    )
    sock = _listen(host, port)  # fail fast, before the model loads
    try:
        _run(
            model,
            sock,
            host,
            settings,
            device,
            dtype,
            compile_,
            head,
            options,
            access_log,
            quiet,
            insecure,
            max_connections,
        )
    finally:
        sock.close()


def _run(
    model_source,
    sock,
    host,
    settings,
    device,
    dtype,
    compile_,
    head,
    options,
    access_log,
    quiet,
    insecure,
    max_connections,
):
    import uvicorn

    from ..engine.serve import ServedModel
    from ..serve.app import create_app

    net = load(model_source)
    served = ServedModel(
        net, device=device, dtype=dtype, compile=compile_, head=head.value if head else None, options=options
    )
    output.set_batch_size(settings.max_batch_size)
    served.warm_up(settings.max_batch_size)
    app = create_app(served, settings)
    port = sock.getsockname()[1]
    where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and not quiet:
                runner = served.runner
                output.info(
                    f"serving {net.source} as {settings.name!r} on {where} ({runner.device}, "
                    f"{str(runner.dtype).removeprefix('torch.')}, {runner.path}; "
                    f"batches of up to {settings.max_batch_size})"
                )
                if insecure and settings.api_key is None and not _is_loopback(host):
                    output.warn(f"listening on {host} without an API key (--insecure)")

        def handle_exit(self, sig, frame) -> None:
            # Readiness goes to 503 at once; uvicorn stops accepting, lets in-flight requests
            # finish, then the app's shutdown answers what is still queued. Not re-raised
            # afterwards (uvicorn would), so a SIGTERM ends with exit code 0.
            app.service.draining = True
            if self.should_exit and sig == 2:  # a second Ctrl-C: stop now
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(
        app,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=int(settings.timeout) + 5,
        lifespan="on",
        server_header=False,
        limit_concurrency=max_connections,
    )
    Server(config).run(sockets=[sock])


def _api_key(path: Path | None) -> str | None:
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"--api-key-file {path}: cannot read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise UsageError(f"--api-key-file {path}: not UTF-8 text") from None
        if not key:
            raise UsageError(f"--api-key-file {path} is empty")
        return key
    key = os.environ.get("DEIT_API_KEY", "").strip()
    return key or None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _listen(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServeUnavailable(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
