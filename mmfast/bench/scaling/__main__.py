"""``python -m mmfast.bench.scaling``: see :func:`mmfast.bench.scaling.report.main`."""

import sys

from mmfast.bench.scaling.report import main

sys.exit(main())
