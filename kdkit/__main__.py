from kdkit._cli import main

main()
