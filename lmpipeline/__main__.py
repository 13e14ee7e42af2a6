"""``python -m lmpipeline``: the same as ``sublearn lm``."""

from lmpipeline.cli import main

raise SystemExit(main())
