"""`deit serve`: an HTTP inference server (Azure /score, Open Inference Protocol v2,
/embed, /metrics) with dynamic batching and safe defaults. Needs the `serve` extra."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ServeUnavailable, UsageError
from . import output
from .inputs import image_options, load
from .options import (
    DEFAULT_MODEL_NAME,
    AllowTruncatedOpt,
    Backend,
    BackendOpt,
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
    backend: BackendOpt = Backend.auto,
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

    from ..serve.server import is_loopback, listen, run
    from ..serve.service import Settings
    from ..serve.urls import UrlPolicy

    api_key = _api_key(api_key_file)
    if not is_loopback(host) and api_key is None and not insecure:
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
    sock = listen(host, port)  # fail fast, before the model loads
    try:
        from ..engine.serve import ServedModel
        from ..serve.app import create_app

        net = load(model)
        served = ServedModel(
            net,
            device=device,
            dtype=dtype,
            compile=compile_,
            backend=backend.value,
            head=head.value if head else None,
            options=options,
        )
        output.set_batch_size(settings.max_batch_size)  # an out-of-memory warm-up names it
        bound = sock.getsockname()[1]
        where = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"

        def ready() -> None:
            runner = served.runner
            path = runner.path
            if served.choice:  # --backend auto: what warm-up measured fastest, per batch size
                path += f" or {' or '.join(served.others)}, by batch size: " + ", ".join(
                    f"{n}: {b}" for n, b in served.choice.items()
                )
            output.info(
                f"serving {net.source} as {settings.name!r} on {where} ({runner.device}, "
                f"{str(runner.dtype).removeprefix('torch.')}, {path}; "
                f"batches of up to {settings.max_batch_size})"
            )
            if insecure and settings.api_key is None and not is_loopback(host):
                output.warn(f"listening on {host} without an API key (--insecure)")

        app = create_app(served, settings)
        run(app, sock, max_connections=max_connections, access_log=access_log, on_ready=None if quiet else ready)
    finally:
        sock.close()


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


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
