"""`python -m deit_cli` is the same command as `deit` (torchrun uses this form)."""

from deit_cli.cli.app import run

if __name__ == "__main__":
    run()
