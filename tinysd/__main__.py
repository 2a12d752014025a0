"""`python -m tinysd PROMPT`: see tinysd.cli."""
import sys

from tinysd.cli import main

sys.exit(main())
