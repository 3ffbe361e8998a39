"""``python -m bfpaccel.serve --plan PATH [--port P] ...``"""

import sys

from .cli import main

sys.exit(main())
