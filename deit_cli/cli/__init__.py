"""The command line: one module per command, wired in app.py. Never does tensor maths."""
