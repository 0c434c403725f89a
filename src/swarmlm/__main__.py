from swarmlm.cli import main

raise SystemExit(main())
