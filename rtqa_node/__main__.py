from rtqa_node.cli import main

raise SystemExit(main())
