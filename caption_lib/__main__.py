"""`python -m caption_lib ...` is the same as `caption-lib ...`."""

from caption_lib.cli import main

raise SystemExit(main())
