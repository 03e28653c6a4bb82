"""`python -m memflow_cli`: the `memflow` command, as torchrun starts it (`torchrun ... -m memflow_cli render`)."""

from memflow_cli.cli import main

main()
