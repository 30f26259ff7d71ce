from gmai_rl.data.synthetic.cli import main

raise SystemExit(main())
