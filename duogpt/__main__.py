from duogpt.cli import main

raise SystemExit(main())
