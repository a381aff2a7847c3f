from modelmerge.cli import main

main()
