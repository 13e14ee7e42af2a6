from sublearn.cli import main

raise SystemExit(main())
