"""The text commands of the command line (`resa generate`, `resa chat`); `resa.cli` is the entry point and error boundary."""
