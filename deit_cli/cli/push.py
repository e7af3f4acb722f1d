"""`deit push SOURCE REPO_ID`: a model, with a model card, to the Hugging Face Hub."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from . import output
from .options import ForceOpt, JsonOpt, QuietOpt


def push(
    source: Annotated[
        str, typer.Argument(help="A `deit train` run directory, checkpoint file, model directory, or any model source.")
    ],
    repo_id: Annotated[str, typer.Argument(help="The hub repository to push to: owner/name (created if missing).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Keep the folder here (transformers layout, or timm's for a DeiT III, and README.md)."
        ),
    ] = None,
    no_upload: Annotated[
        bool, typer.Option("--no-upload", help="Write the folder (needs --out) and stop before uploading.")
    ] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private (if it is new).")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="The branch to commit to (created if missing; default main).")
    ] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="The commit's message.")] = None,
    license_: Annotated[
        str, typer.Option("--license", help="The card's license (a Hub license id: apache-2.0, mit, other...).")
    ] = "apache-2.0",
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write SOURCE as a Hub model folder and upload it to REPO_ID in one commit.

    The folder loads in transformers with no code of deit's (config.json with the labels, model.safetensors, preprocessor_config.json with the model's evaluation preprocessing) and holds a README.md model card: the architecture, how to use it and, for a `deit train` run, its training data, recipe and validation results (in the card's model-index too, which the Hub shows). A DeiT III, which transformers has no class for, is written in timm's hub layout instead (config.json with pretrained_cfg, model.safetensors), which timm.create_model("hf-hub:...") loads.

    The token is the one huggingface_hub finds (HF_TOKEN, or `hf auth login`). Prints the repository URL (with --no-upload, the folder); --json prints a record. Exit codes: 2 a bad REPO_ID, or --no-upload without --out; 73 --out exists (add --force); 77 no token, or the hub refused it; 69 the hub unreachable.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from ..engine.push import push as run_push

    was_disabled = are_progress_bars_disabled()
    if quiet or not output.show_progress():  # huggingface_hub's upload display, on stderr
        disable_progress_bars()
    try:
        result = run_push(
            source,
            repo_id,
            out=out,
            upload=not no_upload,
            private=private,
            revision=revision,
            commit_message=commit_message,
            license=license_,
            force=force,
        )
    finally:
        if not was_disabled:
            enable_progress_bars()
    if not quiet and not result.has_run:
        output.info("no run summary in this model: the card says its training and evaluation are not known")
    if json_:
        output.write_json(asdict(result))
    elif result.url is not None:
        output.write_line(result.url if result.revision == "main" else f"{result.url}/tree/{result.revision}")
    else:
        output.write_line(str(result.folder))


def register(app: typer.Typer) -> None:
    app.command("push")(push)
