"""``python -m repforget_kernels.driver``: the repforget CLI."""
import sys

from .cli import main

sys.exit(main())
