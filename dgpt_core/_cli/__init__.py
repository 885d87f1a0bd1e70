"""Front ends of the `dgpt` sub-commands that need nothing above the library: `generate` and
`chat`, `train`, `train-node` and `prepare` (the dispatcher, `flows/cli.py`, builds their parsers)."""
