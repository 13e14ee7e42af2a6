"""``python -m theory``: the same as ``sublearn theory``."""

from theory.cli import main

raise SystemExit(main())
