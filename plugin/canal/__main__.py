from canal.cli.main import main

main()
