from llamapro.cli import main

raise SystemExit(main())
