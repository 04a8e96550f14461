"""`python -m difficulty_router.cli` runs the command line."""

from difficulty_router.cli.main import main

raise SystemExit(main())
