from biomedvital.cli import main

main()
