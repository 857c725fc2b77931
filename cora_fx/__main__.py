"""``python -m cora_fx``: the ``cora-fx`` command line."""
import sys

from cora_fx.tools.cli import main

sys.exit(main())
