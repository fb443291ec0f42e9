from hwr.cli import main

main()
