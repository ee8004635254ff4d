"""`python -m bsplan.cli`: the same as the `bsplan` command."""

from bsplan.cli.app import main

main()
