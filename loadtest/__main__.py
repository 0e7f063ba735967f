"""`python -m loadtest run ...` / `python -m loadtest demo`: see loadtest.cli."""

from loadtest.cli import main

main()
