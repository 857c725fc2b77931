"""``python -m cora_fx``: the ``cora-fx`` command line."""
import sys

from .cli import main

sys.exit(main())
