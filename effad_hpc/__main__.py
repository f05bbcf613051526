from effad_hpc.cli import main

raise SystemExit(main())
