"""``python -m lmpipeline``: the same as ``sublearn llm``."""

from lmpipeline.cli import main

raise SystemExit(main())
