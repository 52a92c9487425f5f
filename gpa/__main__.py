"""``python -m gpa``."""

import sys

from gpa.cli import main

sys.exit(main())
