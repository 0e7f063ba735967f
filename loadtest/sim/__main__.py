import sys

from loadtest.sim.cli import main

sys.exit(main())
