from toymodels.cli import main

raise SystemExit(main())
