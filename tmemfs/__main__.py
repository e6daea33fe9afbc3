from tmemfs.cli import main

raise SystemExit(main())
