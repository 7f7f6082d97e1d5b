"""`python -m icegrid` runs the command line, like the `icegrid` script."""

from icegrid.cli import main

main()
