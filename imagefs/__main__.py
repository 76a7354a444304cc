from imagefs.cli import main

raise SystemExit(main())
