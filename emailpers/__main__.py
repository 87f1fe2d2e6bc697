from emailpers.cli import main

main()
