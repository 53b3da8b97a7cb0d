from hier.cli import main

main()
