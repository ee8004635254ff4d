"""The bottom layer: plain arithmetic and plain data, importable without torch (what `bsplan plan`,
`bsplan --help` and `bsplan estimate --params` run on). It imports nothing from the other layers."""
