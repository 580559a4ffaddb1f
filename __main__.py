from hrsa.cli import main

main()
