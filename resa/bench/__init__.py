"""Speed harnesses: each module exposes `add_arguments(parser)` and `run(args)` for the CLI, and
`main(argv)` for `python -m resa.bench.<name>`."""
