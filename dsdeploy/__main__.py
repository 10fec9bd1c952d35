"""`python -m dsdeploy`: the same command line as the `dsdeploy` script."""

from dsdeploy.cli import main

main()
